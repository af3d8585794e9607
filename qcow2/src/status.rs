//! Block status: what a guest range holds, as qemu reports it.
//!
//! An image preallocated with `preallocation=metadata` has every cluster allocated while most of
//! its file is a hole. qemu recognises such images (far more clusters in use than the file has
//! blocks) and then asks the file about each data run, reporting holes as "data, reading as
//! zeros". vdisk does the same, so `map` and copies see such images as qemu-img does: the
//! mapping (`mapping.rs`) then reports data runs with `Holes::AllocatedZeros`.

use std::sync::atomic::Ordering;

use blockdev::Result;

use crate::driver::Qcow2;

/// `metadata_prealloc` values (0: not decided yet).
const NO: u8 = 1;
const YES: u8 = 2;

impl Qcow2 {
    /// Whether [`Qcow2::metadata_preallocated`] has already found the image preallocated with
    /// metadata only (reads never make it decide).
    pub(crate) fn metadata_preallocated_known(&self) -> bool {
        self.metadata_prealloc.load(Ordering::Acquire) == YES
    }

    /// Whether the image looks preallocated with metadata only: more clusters in use than a
    /// ninth over what the file really occupies. Decided once per open, on first use.
    pub(crate) fn metadata_preallocated(&self) -> Result<bool> {
        match self.metadata_prealloc.load(Ordering::Acquire) {
            NO => return Ok(false),
            YES => return Ok(true),
            _ => {}
        }
        let io = self.file.as_ref();
        let cs = self.cluster_size();
        let verdict = match io.allocated_size()? {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let clusters = io.len()?.div_ceil(cs);
                let mut m = self.lock();
                let mut used = 0u64;
                let mut verdict = false;
                for c in 0..clusters {
                    if m.rc.get(io, c)? > 0 {
                        used += 1;
                        if used > threshold {
                            verdict = true;
                            break;
                        }
                    }
                }
                verdict
            }
        };
        self.metadata_prealloc.store(if verdict { YES } else { NO }, Ordering::Release);
        Ok(verdict)
    }
}
