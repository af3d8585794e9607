//! Compressed clusters: raw deflate with a 4 KiB window (qemu's "zlib") and zstd.
//!
//! Each cluster is compressed on its own. A compressed cluster is only worth storing when it is
//! strictly smaller than a cluster; otherwise the caller writes the data uncompressed, as qemu-img
//! does. Decompression never trusts the input: output is bounded by the cluster size, and trailing
//! bytes after the stream (the rest of the last sector) are ignored.

use blockdev::{Error, Result};
use flate2::{Decompress, FlushDecompress};

use crate::header::CompressionType;
use crate::limits::ZSTD_MAX_WINDOW_LOG;

/// Deflate level vdisk compresses at (see [`compress`]).
const DEFLATE_LEVEL: i32 = 9;

/// Window bits qemu uses for deflate (4 KiB window).
const WINDOW_BITS: u8 = 12;

/// Compresses one cluster; `None` when the result would not be smaller than `data.len() - 1`.
/// The output is allocated at its exact size; compression contexts are reused per thread.
pub fn compress(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(1);
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.resize(limit, 0);
        match kind {
            CompressionType::Zlib => DEFLATE.with(|d| {
                let mut d = d.borrow_mut();
                let d = d.get_or_insert_with(|| {
                    // qemu's format: raw deflate, 4 KiB window, memLevel 9. Level 9, not qemu's
                    // 6: zlib-rs at level 6 comes out about 4% larger than qemu's zlib at 6, at
                    // 9 within half a percent of it (and still faster; see BENCHMARKS.md).
                    zlib_rs::Deflate::new_with_config(zlib_rs::DeflateConfig {
                        level: DEFLATE_LEVEL,
                        method: zlib_rs::Method::Deflated,
                        window_bits: -(WINDOW_BITS as i32),
                        mem_level: 9,
                        strategy: zlib_rs::Strategy::Default,
                    })
                });
                d.reset();
                match d.compress(data, &mut scratch[..], zlib_rs::DeflateFlush::Finish) {
                    Ok(zlib_rs::Status::StreamEnd) => Ok(Some(scratch[..d.total_out() as usize].to_vec())),
                    Ok(_) => Ok(None), // did not fit
                    Err(e) => Err(Error::invalid_argument(format!("deflate failed: {}", e.as_str()))),
                }
            }),
            CompressionType::Zstd => ZSTD.with(|z| {
                let mut z = z.borrow_mut();
                if z.is_none() {
                    let c =
                        zstd::bulk::Compressor::new(0).map_err(|e| Error::invalid_argument(format!("zstd: {e}")))?;
                    *z = Some(c);
                }
                let Some(c) = z.as_mut() else { return Ok(None) };
                // An output that does not fit the limit is an error here: stored uncompressed.
                Ok(c.compress_to_buffer(data, &mut scratch[..]).ok().map(|n| scratch[..n].to_vec()))
            }),
        }
    })
}

thread_local! {
    /// Output space for one compressed cluster.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// This thread's deflate stream.
    static DEFLATE: std::cell::RefCell<Option<zlib_rs::Deflate>> = const { std::cell::RefCell::new(None) };
    /// This thread's zstd compression context.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Decompresses `input` into exactly `out.len()` bytes (one cluster).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            let mut d = Decompress::new_with_window_bits(false, WINDOW_BITS);
            match d.decompress(input, out, FlushDecompress::Finish) {
                // A full output buffer is success even without the stream end: qemu tolerates
                // Z_BUF_ERROR once the cluster is complete.
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(Error::corrupt("compressed cluster is truncated")),
                Err(e) => Err(Error::corrupt(format!("compressed cluster is invalid: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::raw::Decoder::new().map_err(|e| Error::corrupt(format!("zstd: {e}")))?;
            d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(ZSTD_MAX_WINDOW_LOG))
                .map_err(|e| Error::corrupt(format!("zstd: {e}")))?;
            let mut inb = zstd::stream::raw::InBuffer::around(input);
            let mut outb = zstd::stream::raw::OutBuffer::around(out);
            use zstd::stream::raw::Operation;
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| Error::corrupt(format!("compressed cluster is invalid: {e}")))?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if hint == 0 || (inb.pos(), outb.pos()) == before {
                    return Err(Error::corrupt("compressed cluster is truncated"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 100) as u8).collect()
    }

    #[test]
    fn round_trips_and_tolerates_trailing_bytes() {
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let data = cluster();
            let mut c = compress(kind, &data).unwrap().expect("compressible");
            assert!(c.len() < data.len() / 4);
            c.extend_from_slice(&[0xee; 300]); // rest of the last sector
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data, "{kind:?}");
        }
    }

    #[test]
    fn incompressible_data_is_refused_and_garbage_is_an_error() {
        let mut x = 0x1234_5678u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(compress(kind, &noise).unwrap().is_none(), "{kind:?}");
            let mut out = vec![0u8; 4096];
            assert!(decompress(kind, &noise, &mut out).is_err(), "{kind:?}");
            assert!(decompress(kind, &[], &mut out).is_err(), "{kind:?}");
        }
    }
}
