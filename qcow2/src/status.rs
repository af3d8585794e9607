//! Block status: what a guest range holds, as qemu reports it.
//!
//! An image preallocated with `preallocation=metadata` has every cluster allocated while most of
//! its file is a hole. qemu recognises such images (far more clusters in use than the file has
//! blocks) and then asks the file about each data run, reporting holes as "data, reading as
//! zeros". vdisk does the same, so `map` and copies see such images as qemu-img does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockdev::{Extent, ExtentKind, Result};

use crate::driver::Qcow2;
use crate::entry::Sub;

impl Qcow2 {
    /// The status of the run starting at guest `offset`, at most `max_len` bytes (non-zero).
    pub(crate) fn status_at(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let (sub, run) = self.lock().map(self.file.as_ref(), offset, max_len)?;
        let run = run.clamp(1, max_len);
        let name: Arc<str> = Arc::from(self.data.name());
        let within = offset % self.cluster_size();
        let extent = match sub {
            Sub::Data { host, .. } if self.metadata_preallocated()? => {
                let (data, file_run) = self.data.data_status(host + within, run)?;
                let kind = if data { ExtentKind::Data } else { ExtentKind::ZeroData };
                Extent::mapped(file_run.clamp(1, run), kind, name, host + within)
            }
            Sub::Data { host, .. } => Extent::mapped(run, ExtentKind::Data, name, host + within),
            Sub::Zero { host: Some(h) } => Extent::mapped(run, ExtentKind::Zero, name, h + within),
            Sub::Zero { host: None } => Extent::new(run, ExtentKind::Zero),
            Sub::Unallocated { host: Some(h) } => Extent::mapped(run, ExtentKind::Unallocated, name, h + within),
            Sub::Unallocated { host: None } => Extent::new(run, ExtentKind::Unallocated),
            Sub::Compressed { .. } => Extent { len: run, kind: ExtentKind::Data, host: None, compressed: true },
            Sub::Invalid(why) => return Err(blockdev::Error::corrupt(why)),
        };
        // Encrypted data has no plain bytes in the file to point at (qemu reports no offsets).
        Ok(if self.crypt_scheme.is_some() { Extent { host: None, ..extent } } else { extent })
    }

    /// Whether the image looks preallocated with metadata only: more clusters in use than a
    /// ninth over what the file really occupies. Decided once per open, on first use.
    fn metadata_preallocated(&self) -> Result<bool> {
        // 0 means not decided yet.
        const NO: u8 = 1;
        const YES: u8 = 2;
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
