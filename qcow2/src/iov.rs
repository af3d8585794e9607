//! Slicing lists of I/O buffers by byte range, so one guest request can be split into runs that go
//! to different places (host clusters, the backing file, zero fill) without copying.

use std::io::{IoSlice, IoSliceMut};

/// The buffers covering bytes `[start, start + len)` of the concatenation of `bufs`.
pub fn slice_mut<'a>(bufs: &'a mut [IoSliceMut<'_>], start: u64, len: u64) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = start + len;
    for b in bufs.iter_mut() {
        let blen = b.len() as u64;
        let (bs, be) = (pos, pos + blen);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let a = start.max(bs) - bs;
        let z = end.min(be) - bs;
        let whole: &'a mut [u8] = std::ops::DerefMut::deref_mut(b);
        out.push(IoSliceMut::new(&mut whole[a as usize..z as usize]));
    }
    out
}

/// The buffers covering bytes `[start, start + len)` of the concatenation of `bufs`.
pub fn slice<'a>(bufs: &'a [IoSlice<'_>], start: u64, len: u64) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = start + len;
    for b in bufs {
        let blen = b.len() as u64;
        let (bs, be) = (pos, pos + blen);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let a = (start.max(bs) - bs) as usize;
        let z = (end.min(be) - bs) as usize;
        let whole: &'a [u8] = std::ops::Deref::deref(b);
        out.push(IoSlice::new(&whole[a..z]));
    }
    out
}

/// Fills bytes `[start, start + len)` of `bufs` with zeros.
pub fn zero(bufs: &mut [IoSliceMut<'_>], start: u64, len: u64) {
    for mut s in slice_mut(bufs, start, len) {
        s.fill(0);
    }
}

/// Copies `data` into bytes starting at `start` of `bufs`.
pub fn scatter(bufs: &mut [IoSliceMut<'_>], start: u64, data: &[u8]) {
    let mut at = 0;
    for mut s in slice_mut(bufs, start, data.len() as u64) {
        let n = s.len();
        s.copy_from_slice(&data[at..at + n]);
        at += n;
    }
}

/// Copies the bytes of `bufs`, in order, into `out` (which is exactly as long).
pub fn gather(bufs: &[IoSlice<'_>], out: &mut [u8]) {
    let mut pos = 0;
    for b in bufs {
        let n = b.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&b[..n]);
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_span_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        {
            let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            scatter(&mut bufs, 2, &[1, 2, 3]);
            zero(&mut bufs, 3, 1);
            let parts = slice_mut(&mut bufs, 1, 4);
            assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![2, 2]);
        }
        assert_eq!(a, [0, 0, 1]);
        assert_eq!(b, [0, 3, 0, 0, 0]);
        let x = [1u8, 2, 3];
        let y = [4u8, 5];
        let bufs = [IoSlice::new(&x), IoSlice::new(&y)];
        let parts = slice(&bufs, 2, 3);
        assert_eq!(parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<_>>(), [3, 4, 5]);
    }
}
