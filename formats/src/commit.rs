//! Committing an image into its backing file: the library half of `qemu-img commit`, shared by
//! the CLI's `commit` and [`crate::TemporaryOverlay::commit`].
//!
//! A commit copies everything the top image of a backing chain allocates (and every image between
//! the top and the base) into the base, then usually empties the top so that it shows the base
//! through. [`commit_into`] does the first half: it grows the base if it is smaller than the top,
//! copies what the chain above the base allocates (data as it is, ranges the chain marks as zero
//! as zero writes; nothing below the base is touched), and flushes the base.
//!
//! Ordering rule: **the base must be durable before the top is emptied.** Until the base has been
//! flushed, the copied data may still sit in a volatile cache and a crash may lose any part of it;
//! if the top had already dropped its allocations by then, the chain would show the base's old
//! content where the top's was, and the top's data would be gone. So callers empty the top (for
//! example with [`blockdev::BackingOps::make_empty`]) only after [`commit_into`] has returned
//! `Ok`, which it does only once the base's flush has completed; on any error they leave the top
//! alone. With that order every crash point leaves the chain showing the top's content: before the
//! flush the top still holds everything, after it the base does. The base alone shows, sector by
//! sector, its old content or the top's (the copy is not atomic), and after a completed commit the
//! top's former content.

use std::sync::atomic::AtomicBool;

use blockdev::copy::{count_data, Copy, CopyOptions, DEFAULT_BUF_SIZE};
use blockdev::{BlockDriver, Error, ResizeOptions};

/// The step of [`commit_into`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitStep {
    /// Growing the base to the top's size.
    Resize,
    /// Finding out what the chain above the base allocates.
    Count,
    /// Copying it into the base (what qemu-img calls the block job).
    Copy,
    /// Flushing the base.
    Flush,
}

/// Why [`commit_into`] failed: the step and the error it returned.
#[derive(Debug)]
pub struct CommitError {
    /// Which step failed.
    pub step: CommitStep,
    /// The error, as the step returned it.
    pub error: Error,
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for CommitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<CommitError> for Error {
    fn from(e: CommitError) -> Error {
        e.error
    }
}

/// Copies everything `top`'s chain allocates above depth `depth` (1: the top image alone; the
/// base's depth below the top for `commit`) into `base_rw`, the base opened read-write, growing it
/// first if it is smaller than `top`; then flushes `base_rw`. `progress` receives the data bytes
/// handed to the copy so far and the total to copy.
///
/// Returns only once the base is durable: the caller may then empty the top (see the module docs
/// for the ordering rule), and must not before. On error the base may hold part of the data; the
/// top is never written.
pub fn commit_into(
    top: &dyn BlockDriver,
    base_rw: &dyn BlockDriver,
    depth: u32,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(), CommitError> {
    let at = |step: CommitStep| move |error: Error| CommitError { step, error };
    let len = top.size();
    if base_rw.size() < len {
        base_rw.resize(len, &ResizeOptions::default()).map_err(at(CommitStep::Resize))?;
    }
    let copy = Copy {
        src: top,
        src_offset: 0,
        dst: base_rw,
        dst_offset: 0,
        len,
        // Only what the chain above the base allocates; data as it is, zeroes as zero writes.
        opts: CopyOptions {
            detect_zeroes: false,
            above: Some(depth),
            buf_size: DEFAULT_BUF_SIZE,
            ..CopyOptions::default()
        },
    };
    let total = count_data(&copy).map_err(at(CommitStep::Count))?;
    copy.run(&|p| progress(p.done, total), &|_| {}, &AtomicBool::new(false), total).map_err(at(CommitStep::Copy))?;
    base_rw.flush().map_err(at(CommitStep::Flush))
}
