//! Heap buffers with a guaranteed address alignment.
//!
//! O_DIRECT needs buffers aligned to the device's memory alignment; the copy engine allocates its
//! I/O buffers here so that direct I/O never has to bounce them.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zero-initialised byte buffer whose start is aligned to `align` bytes.
pub struct AlignedBuf {
    /// The aligned start inside the allocation.
    ptr: NonNull<u8>,
    /// The allocation's start and layout (`len + align - 1` bytes, byte-aligned).
    base: NonNull<u8>,
    layout: Layout,
    len: usize,
    align: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like &Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two; 4096 is always enough).
    ///
    /// The allocation is byte-aligned and `align - 1` bytes longer, the start aligned by hand: the
    /// allocator then serves it zeroed with `calloc`, whose large blocks are fresh pages that
    /// cost no memory until touched (an over-aligned zeroed allocation would write every byte),
    /// so a buffer sized for the largest request only occupies what requests use.
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1).next_power_of_two();
        let size = len.max(1).checked_add(align - 1).expect("buffer size overflows usize");
        let layout = Layout::from_size_align(size, 1).expect("buffer size overflows isize");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        let offset = raw.align_offset(align);
        assert!(offset < align, "align_offset of a byte pointer is below the alignment");
        // SAFETY: offset + len <= size, so the aligned start and len bytes after it are inside
        // the allocation.
        let ptr = unsafe { NonNull::new_unchecked(raw.add(offset)) };
        AlignedBuf { ptr, base, layout, len, align }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` at `base` with this layout.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes, align {})", self.len, self.align)
    }
}

/// Whether every byte of `buf` is zero. Compares word-sized chunks; the compiler vectorises the loop.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body.chunks(8).all(|c| c.iter().fold(0u128, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for (len, align) in [(10000, 4096), (0, 4096), (1, 1), (3 << 20, 4096), (513, 512), (100, 3)] {
            let mut b = AlignedBuf::new(len, align);
            assert_eq!(b.as_ptr() as usize % align.next_power_of_two(), 0, "{len} {align}");
            assert!(is_zero(&b));
            assert_eq!(b.len(), len);
            if len > 0 {
                b[len - 1] = 7;
                b[0] = 7;
                assert_eq!((b[0], b[len - 1]), (7, 7));
            }
        }
    }

    #[test]
    fn zero_detection_finds_any_nonzero_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 15, 16, 17, 2048, 4097, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(is_zero(&v[..i]));
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
