//! Fuzzes the format registry's probe and open path on arbitrary bytes, for every registered
//! format (raw included).
//!
//! `Registry::open` works on host files, so this target does what it does over a `MemStorage`:
//! probe the first 512 bytes (`Registry::probe_bytes`), then open the container with the probed
//! format (a probed raw image opened writable gets the same first-sector guard, built from the
//! registry's probes) and, separately, with each registered format named explicitly. Every opened
//! image has its size, block status at 0 and a few sectors (start, middle, end) read.
//!
//! Input layout: one flag byte (bit 0: open the probed format writable; bit 1: then try to write
//! the input's first 512 bytes, bit-inverted if bit 2 is set, over sector 0), then the container's
//! bytes.
//!
//! Invariants asserted:
//! - probing is deterministic and picks a format whose probe score is the highest among the
//!   registered formats and those qemu knows that vdisk cannot open yet (raw when no other format
//!   claims the bytes);
//! - raw, opened explicitly: the size is the length rounded up to 512 and reads return the
//!   container's bytes (zeros past its end);
//! - a probed raw image opened writable never lets a write make its first sector probe as another
//!   format (one vdisk cannot open included): after any write attempt, the container still probes
//!   as raw.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use blockdev::{BlockDriver, Chain, MemStorage, OpenOptions, ReferencePolicy, Storage};
use formats::{raw, Probed, Registry, FOREIGN_FORMATS, PROBE_SIZE};
use libfuzzer_sys::fuzz_target;

fn storage(bytes: &[u8]) -> Arc<MemStorage> {
    Arc::new(MemStorage::new("fuzz.img", bytes.to_vec()).with_limit(bytes.len() as u64 + (1 << 20)))
}

fn options(read_only: bool) -> OpenOptions {
    OpenOptions { read_only, no_backing: true, references: ReferencePolicy::Deny, ..OpenOptions::default() }
}

fn head(s: &dyn Storage) -> Vec<u8> {
    let len = s.len().unwrap().min(PROBE_SIZE as u64) as usize;
    let mut h = vec![0u8; len];
    blockdev::read_exact_at(s, 0, &mut h).unwrap();
    h
}

/// Reads a few sectors and the block status; returns what was read at offset 0.
fn exercise(img: &dyn BlockDriver) -> Vec<(u64, Vec<u8>)> {
    let size = img.size();
    let mut out = Vec::new();
    if size == 0 {
        return out;
    }
    if let Ok(e) = img.block_status(0, size) {
        assert!(e.len > 0 && e.len <= size);
    }
    for at in [0, size / 2 / 512 * 512, size.saturating_sub(4096) / 512 * 512] {
        let n = (size - at).min(4096) as usize;
        let mut buf = vec![0xaau8; n];
        if img.read_at(at, &mut [IoSliceMut::new(&mut buf)]).is_ok() {
            out.push((at, buf));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let reg = Registry::new();

    // Probe as Registry::open does.
    let s = storage(bytes);
    let h = head(s.as_ref());
    let probed = reg.probe_bytes(&h, "fuzz.img");
    assert_eq!(reg.probe_bytes(&h, "fuzz.img").name(), probed.name(), "probing is not deterministic");
    let registered = reg.names().into_iter().map(|n| reg.format(n).unwrap().probe(&h, "fuzz.img"));
    let foreign = FOREIGN_FORMATS.iter().map(|f| (f.probe)(&h, "fuzz.img"));
    let best = registered.chain(foreign).max().unwrap();
    if !h.is_empty() {
        assert_eq!(probed.score(&h, "fuzz.img"), best, "{} does not have the best score", probed.name());
    }
    // A format vdisk cannot open yet is refused by Registry::open; only the explicit opens below
    // apply to it.
    let fmt = match probed {
        Probed::Format(f) => Some(f),
        Probed::Foreign(_) => None,
    };

    // Open with the probed format.
    let writable = flags & 1 != 0;
    if fmt.is_some_and(|f| f.name() == "raw") && writable {
        let img = raw::RawDriver::new(s.clone(), false, Some(reg.raw_probe_guard())).expect("raw opens anything");
        exercise(&img);
        if flags & 2 != 0 && img.size() > 0 {
            let mut sector: Vec<u8> = bytes.iter().take(512).copied().collect();
            if flags & 4 != 0 {
                sector.iter_mut().for_each(|b| *b = !*b);
            }
            let n = sector.len().min(img.size() as usize);
            let _ = img.write_at(0, &[IoSlice::new(&sector[..n])]);
            let _ = img.write_zeroes(0, n as u64, blockdev::ZeroFlags::default());
            let after = head(s.as_ref());
            assert_eq!(
                reg.probe_bytes(&after, "").name(),
                "raw",
                "a write made a probed raw image probe as another format"
            );
        }
    } else if let Some(Ok(img)) = fmt.map(|f| f.open(s.clone(), &options(!writable), &Chain::new(), &reg)) {
        exercise(img.as_ref());
        let _ = img.close();
    }

    // Open with every format named explicitly, read-only.
    for name in reg.names() {
        let s = storage(bytes);
        let Ok(img) = reg.format(name).unwrap().open(s, &options(true), &Chain::new(), &reg) else { continue };
        let read = exercise(img.as_ref());
        if name == "raw" {
            assert_eq!(img.size(), (bytes.len() as u64).div_ceil(512) * 512);
            for (at, buf) in read {
                for (i, &b) in buf.iter().enumerate() {
                    let want = bytes.get(at as usize + i).copied().unwrap_or(0);
                    assert_eq!(b, want, "raw read at {} differs from the container", at as usize + i);
                }
            }
        }
    }
});
