//! Sub-ranges of scatter-gather lists, taken in place (no copy of the bytes), and the copy a
//! format needs from a private buffer into a list (decompressed or decrypted bytes).

use std::io::{IoSlice, IoSliceMut};

/// The pieces of a list of buffers of lengths `lens` that cover bytes `[from, from + len)`:
/// (buffer index, start, end) within each buffer, in order.
fn pieces(lens: impl Iterator<Item = usize>, from: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
    let end = from + len;
    lens.scan(0u64, |pos, n| {
        let start = *pos;
        *pos += n as u64;
        Some((start, *pos))
    })
    .enumerate()
    .skip_while(move |&(_, (_, stop))| stop <= from)
    .take_while(move |&(_, (start, _))| start < end)
    .filter(|&(_, (start, stop))| stop > start)
    .map(move |(i, (start, stop))| (i, (from.saturating_sub(start)) as usize, (end.min(stop) - start) as usize))
}

/// Runs `f` on the buffers covering bytes `[from, from + len)` of `bufs` (slices of the caller's
/// buffers, not copies). `from + len` must not exceed the list's length.
pub fn with_range_mut<R>(
    bufs: &mut [IoSliceMut<'_>],
    from: u64,
    len: u64,
    f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
) -> R {
    if let [one] = bufs {
        return f(&mut [IoSliceMut::new(&mut one[from as usize..(from + len) as usize])]);
    }
    let ranges: Vec<(usize, usize, usize)> = pieces(bufs.iter().map(|b| b.len()), from, len).collect();
    let mut parts: Vec<IoSliceMut<'_>> = Vec::with_capacity(ranges.len());
    let mut wanted = ranges.iter().peekable();
    for (i, b) in bufs.iter_mut().enumerate() {
        if let Some(&(_, lo, hi)) = wanted.next_if(|&&(index, _, _)| index == i) {
            parts.push(IoSliceMut::new(&mut b[lo..hi]));
        }
    }
    f(&mut parts)
}

/// Appends the buffers covering bytes `[from, from + len)` of `bufs` to `out`.
pub fn push_range<'a>(bufs: &'a [IoSlice<'a>], from: u64, len: u64, out: &mut Vec<IoSlice<'a>>) {
    out.extend(pieces(bufs.iter().map(|b| b.len()), from, len).map(|(i, lo, hi)| IoSlice::new(&bufs[i][lo..hi])));
}

/// Fills every buffer with zeros.
pub fn zero(bufs: &mut [IoSliceMut<'_>]) {
    for b in bufs.iter_mut() {
        b.fill(0);
    }
}

/// Zeros that writes of zeros point at (many list entries may share it).
pub(super) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Appends list entries for `len` zero bytes to `out`.
pub fn push_zeros(len: u64, out: &mut Vec<IoSlice<'_>>) {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        out.push(IoSlice::new(&ZEROS[..n]));
        left -= n as u64;
    }
}

/// Copies `data` into bytes `[from, from + data.len())` of `bufs` (which must be that long).
pub fn copy_into(bufs: &mut [IoSliceMut<'_>], from: u64, data: &[u8]) {
    let mut at = 0;
    for (i, lo, hi) in pieces(bufs.iter().map(|b| b.len()), from, data.len() as u64).collect::<Vec<_>>() {
        bufs[i][lo..hi].copy_from_slice(&data[at..at + hi - lo]);
        at += hi - lo;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_a_list_are_the_callers_bytes() {
        let (mut a, mut b, mut c) = ([1u8; 3], [2u8; 4], [3u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b), IoSliceMut::new(&mut c)];
        let lens = with_range_mut(&mut bufs, 2, 7, |parts| {
            zero(parts);
            parts.iter().map(|p| p.len()).collect::<Vec<_>>()
        });
        assert_eq!(lens, vec![1, 4, 2]);
        assert_eq!(a, [1, 1, 0]);
        assert_eq!(b, [0; 4]);
        assert_eq!(c, [0, 0, 3, 3, 3]);
    }

    #[test]
    fn pushed_ranges_cover_exactly_the_asked_bytes() {
        let (a, b) = ([1u8, 2, 3], [4u8, 5]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
        let mut out = Vec::new();
        push_range(&bufs, 1, 3, &mut out);
        let bytes: Vec<u8> = out.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes, vec![2, 3, 4]);
        let mut zeros = Vec::new();
        push_zeros((64 << 10) + 5, &mut zeros);
        assert_eq!(zeros.iter().map(|s| s.len()).sum::<usize>(), (64 << 10) + 5);
    }

    #[test]
    fn copies_into_a_list_span_its_buffers() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        copy_into(&mut bufs, 2, &[7, 8, 9]);
        assert_eq!(a, [0, 0, 7]);
        assert_eq!(b, [8, 9, 0, 0, 0]);
    }
}
