//! Model-based testing for any writable format: random operation sequences applied to a driver and
//! to an in-memory model of the disk, which must agree after every step.
//!
//! A format's test supplies how to open its image ([`Subject`]) and the model of the initial
//! content; [`run`] applies the operations, checks the bytes each touched range reads back after
//! every operation and the whole disk at the end, and returns the model so the caller can ask the
//! oracle (`qemu-img compare`, `qemu-img check`) about the file. Used with proptest ([`ops`]),
//! a failure shrinks to a minimal sequence; [`stress`] runs the same operations from many threads
//! on one shared driver.
//!
//! What the model allows where formats may differ: a discard leaves each byte either unchanged,
//! zero, or the backing file's byte (formats discard whole clusters or nothing); newly grown space
//! reads zeros or the backing file.

use std::sync::Arc;

use blockdev::{BlockDriver, ResizeOptions, ZeroFlags};
use proptest::prelude::*;

/// One guest operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes `len` pseudo-random bytes (from `seed`) at `off`.
    Write {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Content seed.
        seed: u64,
    },
    /// Writes zeroes, optionally letting the format deallocate.
    Zero {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// May unmap.
        unmap: bool,
    },
    /// Discards.
    Discard {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// Grows the disk by `by` bytes.
    Grow {
        /// Growth in bytes.
        by: u64,
    },
    /// Flushes.
    Flush,
    /// Closes the image and opens it again.
    Reopen,
}

/// A strategy for operations within a disk of `size` bytes, at multiples of `align` bytes (1 for
/// byte-granular requests), at most `max_len` bytes long.
pub fn ops(size: u64, align: u64, max_len: u64) -> impl Strategy<Value = Op> {
    let units = size / align;
    let range = (0..units, 1..=max_len / align).prop_map(move |(o, l)| (o * align, l * align));
    prop_oneof![
        5 => (range.clone(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (1..8u64).prop_map(move |k| Op::Grow { by: k * align.max(512) * 97 }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// The image under test: how to open it, and what discards and growth may reveal.
pub struct Subject<'a> {
    /// Opens the image read-write.
    pub open: &'a (dyn Fn() -> blockdev::Result<Arc<dyn BlockDriver>> + Sync),
    /// The backing file's content, if there is one (`None` past its end).
    pub backing: Option<&'a [u8]>,
}

impl Subject<'_> {
    fn backing_byte(&self, pos: usize) -> Option<u8> {
        self.backing.and_then(|b| b.get(pos).copied())
    }

    /// Whether a byte at `pos` that held `old` may read `new` after a discard.
    fn discard_ok(&self, pos: usize, old: u8, new: u8) -> bool {
        new == old || new == 0 || Some(new) == self.backing_byte(pos)
    }
}

/// `[off, off + len)` clipped to a disk of `size` bytes, or `None` if it starts past the end.
fn clip(off: u64, len: u64, size: u64) -> Option<(usize, usize)> {
    (off < size).then(|| (off as usize, (off + len).min(size) as usize))
}

fn read(drv: &Arc<dyn BlockDriver>, from: usize, to: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; to - from];
    drv.read_exact_at(from as u64, &mut buf).map_err(|e| format!("read {from}..{to}: {e}"))?;
    Ok(buf)
}

/// Applies `op` to `drv` and to `model`, then checks that the touched range reads as the model.
/// `Reopen` is the caller's (it needs the opener); here it is a flush.
pub fn apply(subject: &Subject<'_>, drv: &Arc<dyn BlockDriver>, model: &mut Vec<u8>, op: &Op) -> Result<(), String> {
    let size = model.len() as u64;
    let e = |what: &str, err: blockdev::Error| format!("{what} ({op:?}): {err}");
    let (from, to) = match *op {
        Op::Write { off, len, seed } => {
            let Some((from, to)) = clip(off, len, size) else { return Ok(()) };
            let data = crate::pseudo_random(to - from, seed);
            drv.write_all_at(from as u64, &data).map_err(|err| e("write", err))?;
            model[from..to].copy_from_slice(&data);
            (from, to)
        }
        Op::Zero { off, len, unmap } => {
            let Some((from, to)) = clip(off, len, size) else { return Ok(()) };
            let flags = ZeroFlags { may_unmap: unmap, no_fallback: false };
            drv.write_zeroes(from as u64, (to - from) as u64, flags).map_err(|err| e("write_zeroes", err))?;
            model[from..to].fill(0);
            (from, to)
        }
        Op::Discard { off, len } => {
            let Some((from, to)) = clip(off, len, size) else { return Ok(()) };
            drv.discard(from as u64, (to - from) as u64).map_err(|err| e("discard", err))?;
            let now = read(drv, from, to)?;
            for (i, (&old, &new)) in model[from..to].iter().zip(&now).enumerate() {
                if !subject.discard_ok(from + i, old, new) {
                    return Err(format!("{op:?}: byte {} reads {new:#x} after discard (was {old:#x})", from + i));
                }
            }
            model[from..to].copy_from_slice(&now);
            return Ok(());
        }
        Op::Grow { by } => {
            let new = size + by;
            drv.resize(new, &ResizeOptions::default()).map_err(|err| e("resize", err))?;
            let tail = read(drv, size as usize, new as usize)?;
            for (i, &b) in tail.iter().enumerate() {
                let pos = size as usize + i;
                if b != 0 && Some(b) != subject.backing_byte(pos) {
                    return Err(format!("{op:?}: grown byte {pos} reads {b:#x}"));
                }
            }
            model.extend_from_slice(&tail);
            return Ok(());
        }
        Op::Flush | Op::Reopen => {
            drv.flush().map_err(|err| e("flush", err))?;
            return Ok(());
        }
    };
    if read(drv, from, to)? != model[from..to] {
        return Err(format!("{op:?}: the range reads back differently from what was written"));
    }
    Ok(())
}

/// Runs `ops` from `initial` content; returns the final model after checking the whole disk and
/// closing the image.
pub fn run(subject: &Subject<'_>, initial: Vec<u8>, ops: &[Op]) -> Result<Vec<u8>, String> {
    let mut model = initial;
    let mut drv = (subject.open)().map_err(|e| format!("open: {e}"))?;
    for (i, op) in ops.iter().enumerate() {
        apply(subject, &drv, &mut model, op).map_err(|e| format!("operation {i}: {e}"))?;
        if *op == Op::Reopen {
            drv.close().map_err(|e| format!("close: {e}"))?;
            drop(drv);
            drv = (subject.open)().map_err(|e| format!("reopen: {e}"))?;
        }
    }
    if drv.size() != model.len() as u64 {
        return Err(format!("disk size {} but the model has {}", drv.size(), model.len()));
    }
    if read(&drv, 0, model.len())? != model {
        return Err("the disk's content differs from the model".to_string());
    }
    drv.close().map_err(|e| format!("close: {e}"))?;
    Ok(model)
}

/// `VDISK_PROPTEST_CASES` if set (for long runs), else `default`.
pub fn cases(default: u32) -> u32 {
    env_number("VDISK_PROPTEST_CASES").map_or(default, |n| n as u32)
}

/// A number from the environment variable `name`, if it is set and parses.
pub fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What [`stress`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct StressStats {
    /// Operations run, over all threads.
    pub operations: u64,
    /// Bytes each thread checked by reading its ranges back while the others were running.
    pub bytes_verified: u64,
}

/// One stress thread's pieces (index, final bytes) and the bytes it verified.
type ThreadResult = Result<(Vec<(u64, Vec<u8>)>, u64), String>;

/// Runs `per_thread` random operations from each of `threads` threads on one shared `drv`.
/// The disk is split into `chunk`-byte pieces owned round-robin by the threads (`chunk` should be
/// a multiple of the format's allocation unit, so discards of one thread cannot touch another's
/// data); each thread writes, zeroes, discards and flushes within its own pieces, checks every
/// range it touches right away, and checks all its pieces at the end. Returns the merged model.
pub fn stress(
    subject: &Subject<'_>,
    drv: &Arc<dyn BlockDriver>,
    initial: Vec<u8>,
    chunk: u64,
    threads: u64,
    per_thread: u64,
) -> Result<(Vec<u8>, StressStats), String> {
    let size = initial.len() as u64;
    let chunks = size / chunk;
    assert!(chunks >= threads, "too few chunks for {threads} threads");
    let results: Vec<ThreadResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let initial = &initial;
                scope.spawn(move || -> ThreadResult {
                    let mut rng = crate::XorShift::new(0x57_2e55 ^ (t << 32));
                    // This thread's view: a model holding only its own pieces' bytes.
                    let mut model = initial.clone();
                    let mine: Vec<u64> = (0..chunks).filter(|c| c % threads == t).collect();
                    let mut verified = 0u64;
                    for i in 0..per_thread {
                        let c = mine[rng.below(mine.len() as u64) as usize];
                        let start = rng.below(chunk / 512) * 512;
                        let len = (1 + rng.below((chunk - start) / 512)) * 512;
                        let off = c * chunk + start;
                        let op = match rng.below(10) {
                            0..=5 => Op::Write { off, len, seed: rng.next() },
                            6 | 7 => Op::Zero { off, len, unmap: rng.below(2) == 0 },
                            8 => Op::Discard { off, len },
                            _ => Op::Flush,
                        };
                        apply(subject, drv, &mut model, &op).map_err(|e| format!("thread {t} op {i}: {e}"))?;
                        verified += len;
                    }
                    let mut pieces = Vec::with_capacity(mine.len());
                    for &c in &mine {
                        let (from, to) = ((c * chunk) as usize, ((c + 1) * chunk) as usize);
                        if read(drv, from, to)? != model[from..to] {
                            return Err(format!("thread {t}: piece {c} differs from its model at the end"));
                        }
                        pieces.push((c, model[from..to].to_vec()));
                    }
                    Ok((pieces, verified))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".to_string()))).collect()
    });
    let mut merged = initial;
    let mut stats = StressStats::default();
    for r in results {
        let (pieces, verified) = r?;
        for (c, bytes) in pieces {
            merged[(c * chunk) as usize..((c + 1) * chunk) as usize].copy_from_slice(&bytes);
        }
        stats.bytes_verified += verified;
    }
    stats.operations = threads * per_thread;
    Ok((merged, stats))
}
