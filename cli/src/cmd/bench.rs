//! `bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain]
//! [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename`
//!
//! qemu-img's I/O benchmark: `count` requests of `buffer_size` bytes, `depth` of them in flight,
//! the first at `offset` and each next one `step_size` further, wrapping at the end of the image.
//! The arguments are parsed into a [`BenchArgs`] value with qemu-img's messages; then the image is
//! opened and the requests run.
//!
//! Concurrency follows the project's model instead of qemu's AIO: `depth` worker threads issue
//! synchronous requests on the shared `Arc<dyn BlockDriver>`, so at most `depth` are in flight.
//! Per request a worker does one atomic increment (to claim the request's index, from which its
//! offset follows), one bounds check and the I/O call, into one buffer it owns for the whole run:
//! no allocation, no lock. With `--flush-interval` a mutex-protected state machine reproduces
//! qemu's schedule instead: when, at a completion, the number of requests not yet issued is a
//! multiple of the interval, the queue is drained and a flush issued before new requests start
//! (`--no-drain`: the flush runs beside the requests).
//!
//! `-i threads|native|io_uring` and `-n` are accepted as qemu accepts them; all run on the thread
//! pool. As in qemu, native AIO needs `-t none` or `-t directsync`, and without it the open fails
//! with qemu's message. Where qemu-img would misbehave, vdisk refuses instead, and says so:
//! a depth of 0 (qemu waits forever for requests it never issues) is an invalid queue depth, and
//! the pool never exceeds [`MAX_WORKERS`] threads (the kernel sees no deeper queue from more
//! synchronous threads than that, and each costs a stack).

use std::io::{IoSlice, IoSliceMut, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use blockdev::{BlockDriver, CacheMode, OpenOptions};

use crate::args::{flag, opt, parse, Opt, Parsed};
use crate::cmd::{cvtnum, cvtnum_full, registry};
use crate::common::{img_open, OpenRequest};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("c", Some('c'), None),
    opt("d", Some('d'), None),
    opt("f", Some('f'), None),
    flag("n", Some('n'), None),
    opt("i", Some('i'), None),
    opt("o", Some('o'), None),
    flag("q", Some('q'), None),
    opt("s", Some('s'), None),
    opt("S", Some('S'), None),
    opt("t", Some('t'), None),
    flag("w", Some('w'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("pattern", None, Some("pattern")),
    opt("flush-interval", None, Some("flush-interval")),
    flag("no-drain", None, Some("no-drain")),
    flag("image-opts", None, Some("image-opts")),
];

/// Most worker threads a run uses, whatever the depth.
pub const MAX_WORKERS: u64 = 1024;

const INT_MAX: u64 = i32::MAX as u64;

/// Everything the command line says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchArgs {
    /// `-c`: number of requests (default 75000).
    pub count: u64,
    /// `-d`: requests in flight (default 64).
    pub depth: u64,
    /// `-o`: offset of the first request.
    pub offset: u64,
    /// `-s`: bytes per request (default 4096).
    pub bufsize: u64,
    /// `-S`: distance between requests (0 = `bufsize`).
    pub step: u64,
    /// `--pattern`: the byte written by write tests (default 0).
    pub pattern: u8,
    /// `--flush-interval` (0 = never flush).
    pub flush_interval: u64,
    /// Drain the queue before flushing (`--no-drain` turns it off).
    pub drain: bool,
    /// `-w`: write instead of read.
    pub write: bool,
    /// `-t`.
    pub cache: CacheMode,
    /// `-n` or `-i native`.
    pub native_aio: bool,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
    /// The image.
    pub filename: String,
}

impl BenchArgs {
    /// The step between requests as qemu uses it.
    pub fn effective_step(&self) -> u64 {
        if self.step == 0 {
            self.bufsize
        } else {
            self.step
        }
    }

    /// The header lines qemu-img prints before the run.
    pub fn header(&self) -> String {
        let mut s = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.effective_step()
        );
        if self.flush_interval > 0 {
            s.push_str(&format!("Sending flush every {} requests\n", self.flush_interval));
        }
        s
    }
}

/// strtoul with base 0 on the whole string, as qemu_strtoul: leading blanks and a sign are
/// allowed, a minus wraps around, anything left over is an error.
fn strtoul(s: &str) -> Option<u64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).ok()?;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Every value of option `id`, each parsed with qemu_strtoul and bounded by `max`.
fn ulong_opt(p: &Parsed, id: &str, max: u64, what: &str) -> Result<Option<u64>, CliError> {
    let mut last = None;
    for v in p.values(id) {
        match strtoul(v) {
            Some(n) if n <= max => last = Some(n),
            _ => return Err(CliError::new(format!("Invalid {what} specified"))),
        }
    }
    Ok(last)
}

/// Checks the parsed command line as qemu-img does, in the order of its option switch.
pub fn check_args(p: &Parsed) -> Result<BenchArgs, CliError> {
    let count = ulong_opt(p, "c", INT_MAX, "request count")?.unwrap_or(75000);
    let depth = ulong_opt(p, "d", INT_MAX, "queue depth")?.unwrap_or(64);
    if depth == 0 {
        return Err(CliError::new("Invalid queue depth specified"));
    }
    let mut native_aio = p.has("n");
    for mode in p.values("i") {
        match mode.as_str() {
            "threads" | "io_uring" => {}
            "native" => native_aio = true,
            _ => return Err(CliError::new(format!("Invalid aio option: {mode}"))),
        }
    }
    let mut offset = 0;
    for v in p.values("o") {
        offset = cvtnum("offset", v)?;
    }
    let mut bufsize = 4096;
    for v in p.values("s") {
        bufsize = cvtnum_full("buffer size", v, 0, INT_MAX)?;
    }
    let mut step = 0;
    for v in p.values("S") {
        step = cvtnum_full("step_size", v, 0, INT_MAX)?;
    }
    let mut cache = CacheMode::Writeback;
    for v in p.values("t") {
        cache = CacheMode::parse(v).ok_or_else(|| CliError::new("Invalid cache mode"))?;
    }
    let pattern = ulong_opt(p, "pattern", 0xff, "pattern byte")?.unwrap_or(0) as u8;
    let flush_interval = ulong_opt(p, "flush-interval", INT_MAX, "flush interval")?.unwrap_or(0);
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let write = p.has("w");
    if !write && flush_interval > 0 {
        return Err(CliError::new("--flush-interval is only available in write tests"));
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err(CliError::new("Flush interval can't be smaller than depth"));
    }
    Ok(BenchArgs {
        count,
        depth,
        offset,
        bufsize,
        step,
        pattern,
        flush_interval,
        drain: !p.has("no-drain"),
        write,
        cache,
        native_aio,
        fmt: p.value("f").map(str::to_string),
        image_opts: p.has("image-opts"),
        force_share: p.has("U"),
        filename: p.positional[0].clone(),
    })
}

/// Runs `bench`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    let a = check_args(&p)?;
    let reg = registry();
    let opts =
        OpenOptions { read_only: !a.write, cache: a.cache, force_share: a.force_share, ..OpenOptions::default() };
    let req = OpenRequest { name: &a.filename, fmt: a.fmt.as_deref(), image_opts: a.image_opts, opts };
    let disk = img_open(&reg, &req)?;
    if a.native_aio && !a.cache.is_direct() {
        return Err(CliError::new(format!(
            "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
            a.filename
        )));
    }
    // qemu-img's stdout is a C stream: line-buffered on a terminal, otherwise written at exit, so
    // in a pipe or file its lines come after any error message. Keep that order.
    let header = a.header();
    let deferred = !std::io::stdout().is_terminal();
    if !deferred {
        print!("{header}");
    }
    let bench = Bench::new(&a, disk.as_ref());
    let start = Instant::now();
    let result = bench.run();
    let elapsed = start.elapsed().as_secs_f64();
    if let Err(e) = result {
        let code = e.emit();
        if deferred {
            print!("{header}");
        }
        return Err(CliError::silent(code));
    }
    if deferred {
        print!("{header}");
    }
    println!("Run completed in {elapsed:.3} seconds.");
    // Closing flushes (qemu-img's blk_unref does too, after taking the time).
    disk.close().map_err(|e| CliError::new(format!("error while closing '{}': {}", a.filename, e.message())))?;
    Ok(0)
}

/// One run: the disk, the request stream and the failure that stops it.
struct Bench<'a> {
    disk: &'a dyn BlockDriver,
    size: u64,
    count: u64,
    offset: u64,
    step: u64,
    bufsize: usize,
    pattern: u8,
    write: bool,
    workers: u64,
    mem_align: usize,
    flush_interval: u64,
    drain: bool,
    /// Index of the next request to issue (fast path).
    next: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// The flush schedule (only with `--flush-interval`).
    sched: Mutex<Schedule>,
    turn: Condvar,
}

/// qemu's bookkeeping for flushes: requests not yet completed (`n`), in flight, issued, and
/// whether the queue is draining or a flush is running.
#[derive(Debug, Default)]
struct Schedule {
    n: u64,
    in_flight: u64,
    issued: u64,
    draining: bool,
    flushing: bool,
}

/// Why a request failed, in qemu's words (the system's error text).
fn failure_text(e: &blockdev::Error) -> String {
    match e.errno() {
        Some(errno) => blockdev::io_text(&std::io::Error::from_raw_os_error(errno)),
        None if e.kind() == blockdev::ErrorKind::OutOfRange => eio(),
        None => e.message().to_string(),
    }
}

fn eio() -> String {
    blockdev::io_text(&std::io::Error::from_raw_os_error(libc::EIO))
}

impl<'a> Bench<'a> {
    fn new(a: &BenchArgs, disk: &'a dyn BlockDriver) -> Bench<'a> {
        let mem_align = disk.storage().map(|s| s.alignment().memory as usize).unwrap_or(1).max(4096);
        Bench {
            disk,
            size: disk.size(),
            count: a.count,
            offset: a.offset,
            step: a.effective_step(),
            bufsize: a.bufsize as usize,
            pattern: a.pattern,
            write: a.write,
            workers: a.depth.min(a.count).min(MAX_WORKERS),
            mem_align,
            flush_interval: a.flush_interval,
            drain: a.drain,
            next: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            sched: Mutex::new(Schedule { n: a.count, ..Schedule::default() }),
            turn: Condvar::new(),
        }
    }

    /// Offset of request `index`: the first at `offset`, then `step` further each time, modulo
    /// the image size (qemu wraps the running offset after every request).
    fn offset_of(&self, index: u64) -> u64 {
        if index == 0 {
            self.offset
        } else if self.size == 0 {
            0
        } else {
            ((self.offset as u128 + index as u128 * self.step as u128) % self.size as u128) as u64
        }
    }

    /// Issues the whole run; the error is qemu-img's message.
    fn run(&self) -> Result<(), CliError> {
        std::thread::scope(|scope| {
            let mut spawned = Vec::new();
            for _ in 0..self.workers {
                let worker = std::thread::Builder::new().stack_size(256 << 10).spawn_scoped(scope, || self.worker());
                match worker {
                    Ok(h) => spawned.push(h),
                    Err(e) => {
                        // Fewer threads than asked: the run still completes, less deep.
                        if spawned.is_empty() {
                            self.fail(format!("Failed to start a worker: {}", blockdev::io_text(&e)));
                        }
                        break;
                    }
                }
            }
        });
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(msg) => Err(CliError::new(msg)),
            None => Ok(()),
        }
    }

    fn fail(&self, msg: String) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
        self.failed.store(true, Ordering::SeqCst);
        let _sched = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        self.turn.notify_all();
    }

    /// A buffer of `bufsize` bytes filled with the pattern, aligned for direct I/O, allocated
    /// without aborting when memory is short.
    fn buffer(&self) -> Option<(Vec<u8>, usize)> {
        let mut v = Vec::new();
        v.try_reserve_exact(self.bufsize + self.mem_align).ok()?;
        v.resize(self.bufsize + self.mem_align, self.pattern);
        let start = v.as_ptr().align_offset(self.mem_align).min(self.mem_align);
        Some((v, start))
    }

    fn worker(&self) {
        let Some((mut mem, start)) = self.buffer() else {
            self.fail("Failed to allocate the request buffer: Cannot allocate memory".into());
            return;
        };
        let buf = &mut mem[start..start + self.bufsize];
        let result = if self.flush_interval > 0 { self.scheduled_loop(buf) } else { self.free_loop(buf) };
        if let Err(msg) = result {
            self.fail(msg);
        }
    }

    /// Without flushes: claim the next index, do the request, repeat.
    fn free_loop(&self, buf: &mut [u8]) -> Result<(), String> {
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.count {
                return Ok(());
            }
            self.request(self.offset_of(index), buf)?;
        }
    }

    /// One read or write; errors read as qemu's "Failed request: ...".
    fn request(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let len = buf.len() as u64;
        if offset > self.size || self.size - offset < len {
            return Err(format!("Failed request: {}", eio()));
        }
        let r = if self.write {
            self.disk.write_at(offset, &[IoSlice::new(buf)])
        } else {
            self.disk.read_at(offset, &mut [IoSliceMut::new(buf)])
        };
        r.map_err(|e| format!("Failed request: {}", failure_text(&e)))
    }

    /// With `--flush-interval`: qemu's schedule (see the module docs).
    fn scheduled_loop(&self, buf: &mut [u8]) -> Result<(), String> {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Ok(());
            }
            if s.n <= s.in_flight && !s.draining && !s.flushing {
                // Nothing left to issue; whoever completes the last request does the last flush.
                return Ok(());
            }
            if s.draining || s.flushing || s.n <= s.in_flight {
                s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let index = s.issued;
            s.issued += 1;
            s.in_flight += 1;
            drop(s);
            let result = self.request(self.offset_of(index), buf);
            s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            result?;
            let unissued = s.n - s.in_flight;
            s.n -= 1;
            s.in_flight -= 1;
            if unissued % self.flush_interval != 0 {
                continue;
            }
            if !self.drain {
                drop(s);
                self.disk.flush().map_err(|e| format!("Failed flush request: {}", failure_text(&e)))?;
                s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.draining = true;
            if s.in_flight == 0 {
                s.flushing = true;
                drop(s);
                self.disk.flush().map_err(|e| format!("Failed request: {}", failure_text(&e)))?;
                s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                s.flushing = false;
                s.draining = false;
                self.turn.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;

    fn check(v: &[&str]) -> Result<BenchArgs, CliError> {
        let args: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        check_args(&parse(&args, OPTS)?)
    }

    #[test]
    fn defaults_and_header_match_qemu() {
        let a = check(&["img"]).unwrap();
        assert_eq!((a.count, a.depth, a.bufsize, a.offset, a.effective_step()), (75000, 64, 4096, 0, 4096));
        assert_eq!(
            a.header(),
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n"
        );
        let a =
            check(&["-w", "-c", "0x10", "-d", "4", "-s", "1k", "-S", "8k", "-o", "1M", "--flush-interval=8", "img"])
                .unwrap();
        assert_eq!(
            a.header(),
            "Sending 16 write requests, 1024 bytes each, 4 in parallel (starting at offset 1048576, step size 8192)\n\
             Sending flush every 8 requests\n"
        );
        assert_eq!(check(&["--pattern=0xab", "-n", "-t", "none", "img"]).unwrap().pattern, 0xab);
        assert!(check(&["-i", "native", "img"]).unwrap().native_aio);
        assert!(!check(&["-i", "io_uring", "-i", "threads", "img"]).unwrap().native_aio);
    }

    #[test]
    fn rejections_use_qemu_words() {
        let cases: &[(&[&str], &str)] = &[
            (&["-c", "x", "img"], "Invalid request count specified"),
            (&["-c", "-1", "img"], "Invalid request count specified"),
            (&["-c", "2147483648", "img"], "Invalid request count specified"),
            (&["-c", "5 ", "img"], "Invalid request count specified"),
            (&["-d", "0", "img"], "Invalid queue depth specified"),
            (&["-d", "1e3", "img"], "Invalid queue depth specified"),
            (&["-i", "posix", "img"], "Invalid aio option: posix"),
            (&["-o", "-5", "img"], "Invalid offset specified. Must be between 0 and 9223372036854775807."),
            (&["-s", "3G", "img"], "Invalid buffer size specified. Must be between 0 and 2147483647."),
            (&["-S", "3G", "img"], "Invalid step_size specified. Must be between 0 and 2147483647."),
            (&["-t", "fast", "img"], "Invalid cache mode"),
            (&["--pattern=256", "img"], "Invalid pattern byte specified"),
            (&["--flush-interval=x", "img"], "Invalid flush interval specified"),
            (&["img", "other"], "Expecting one image file name"),
            (&[], "Expecting one image file name"),
            (&["--flush-interval=100", "img"], "--flush-interval is only available in write tests"),
            (&["-w", "--flush-interval=10", "img"], "Flush interval can't be smaller than depth"),
        ];
        for (args, want) in cases {
            assert_eq!(check(args).unwrap_err().message(), *want, "{args:?}");
        }
        assert_eq!(check(&["-c", "-0", "img"]).unwrap().count, 0);
        assert_eq!(check(&["-c", " +010", "img"]).unwrap().count, 8);
    }

    #[test]
    fn offsets_wrap_like_qemu() {
        let a = check(&["-o", "10000", "-S", "3000", "-s", "512", "img"]).unwrap();
        let b = Bench::new(&a, &NullDisk(8192));
        let offs: Vec<u64> = (0..5).map(|i| b.offset_of(i)).collect();
        // The first request keeps its offset even past the end; later ones wrap.
        assert_eq!(offs, [10000, 13000 % 8192, 16000 % 8192, 19000 % 8192, 22000 % 8192]);
        let b = Bench::new(&a, &NullDisk(0));
        assert_eq!(b.offset_of(3), 0);
    }

    /// A disk that only has a size.
    #[derive(Debug)]
    struct NullDisk(u64);

    impl BlockDriver for NullDisk {
        fn format(&self) -> &'static str {
            "null"
        }
        fn size(&self) -> u64 {
            self.0
        }
        fn filename(&self) -> &str {
            "null"
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_at(&self, _: u64, _: &mut [IoSliceMut<'_>]) -> blockdev::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[IoSlice<'_>]) -> blockdev::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: blockdev::ZeroFlags) -> blockdev::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> blockdev::Result<()> {
            Ok(())
        }
        fn flush(&self) -> blockdev::Result<()> {
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> blockdev::Result<blockdev::Extent> {
            Ok(blockdev::Extent::new(len, blockdev::ExtentKind::Data))
        }
        fn resize(&self, _: u64, _: &blockdev::ResizeOptions) -> blockdev::Result<()> {
            Ok(())
        }
        fn info(&self) -> blockdev::Result<blockdev::ImageInfo> {
            Ok(blockdev::ImageInfo::default())
        }
        fn storage(&self) -> Option<std::sync::Arc<dyn blockdev::Storage>> {
            None
        }
    }
}
