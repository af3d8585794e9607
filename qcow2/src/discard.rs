//! Giving freed clusters back to the file system (qemu's discard passthrough).
//!
//! When a cluster's refcount drops to zero, the space it occupies in the image file may be
//! deallocated (a hole punched), depending on what freed it ([`DiscardKind`]) and on the node's
//! `pass-discard-*` options ([`blockdev::DiscardOptions`]), with qemu's defaults: clusters freed
//! by a guest discard or zero write are passed on when the image is opened with `discard=unmap`,
//! those freed by snapshot operations always, others (moved tables) only when asked, and clusters
//! replaced by copy-on-write never.
//!
//! Order: a cluster is punched only when nothing on disk refers to it any more and its refcount
//! of zero is durable ([`crate::refcount::Refcounts::punch_freed`] writes and syncs the refcount
//! blocks first). vdisk lowers a refcount only after the reference is gone from disk (the crate
//! docs, rule 3), so a crash before the punch leaves free space unpunched and a crash after it
//! leaves nothing that reads the hole. A freed cluster taken again before its punch (the
//! allocator may reuse it at once) leaves the queue: it is never punched under new data.
//!
//! The queue holds runs of clusters; it is bounded ([`MAX_PUNCH_RUNS`]): a full queue is punched
//! on the spot.

use blockdev::DiscardOptions;

/// Runs of freed clusters queued before they are punched on the spot.
pub const MAX_PUNCH_RUNS: usize = 1024;

/// What freed a cluster: decides whether its space is passed on to the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardKind {
    /// Never passed on (clusters replaced by copy-on-write, fresh clusters given back after a
    /// failed write).
    Never,
    /// Always passed on (shrinking the disk, bitmaps' clusters).
    Always,
    /// A guest discard or a zero write allowed to unmap (`pass-discard-request`).
    Request,
    /// A snapshot operation or the emptying of an image after commit (`pass-discard-snapshot`).
    Snapshot,
    /// Anything else: tables moved or copied, clusters freed by growing (`pass-discard-other`).
    Other,
}

impl DiscardKind {
    /// Whether clusters freed this way are punched under `opts`.
    pub fn passes(self, opts: &DiscardOptions) -> bool {
        match self {
            DiscardKind::Never => false,
            DiscardKind::Always => true,
            DiscardKind::Request => opts.request(),
            DiscardKind::Snapshot => opts.snapshot(),
            DiscardKind::Other => opts.other(),
        }
    }
}

/// Freed clusters waiting to be punched, as runs `(first cluster, count)`.
#[derive(Debug, Default)]
pub struct Punches {
    runs: Vec<(u64, u64)>,
}

impl Punches {
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether the queue reached [`MAX_PUNCH_RUNS`].
    pub fn is_full(&self) -> bool {
        self.runs.len() >= MAX_PUNCH_RUNS
    }

    /// Queues cluster `c` (extending the last run when it follows it).
    pub fn add(&mut self, c: u64) {
        if let Some((first, count)) = self.runs.last_mut() {
            if *first + *count == c {
                *count += 1;
                return;
            }
        }
        self.runs.push((c, 1));
    }

    /// Takes cluster `c` out of the queue (it is in use again).
    pub fn forget(&mut self, c: u64) {
        let Some(i) = self.runs.iter().position(|&(f, n)| f <= c && c < f + n) else { return };
        let (f, n) = self.runs[i];
        let before = (f, c - f);
        let after = (c + 1, f + n - c - 1);
        self.runs.remove(i);
        for run in [after, before] {
            if run.1 > 0 {
                self.runs.insert(i, run);
            }
        }
    }

    /// Empties the queue, returning its runs sorted and merged where adjacent.
    pub fn take_merged(&mut self) -> Vec<(u64, u64)> {
        let mut runs = std::mem::take(&mut self.runs);
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (f, n) in runs {
            match merged.last_mut() {
                Some((mf, mn)) if *mf + *mn >= f => *mn = (*mn).max(f + n - *mf),
                _ => merged.push((f, n)),
            }
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_grow_split_and_merge() {
        let mut p = Punches::default();
        for c in [5, 6, 7, 1, 2, 9] {
            p.add(c);
        }
        p.forget(6);
        p.forget(1);
        p.forget(100);
        assert_eq!(p.take_merged(), vec![(2, 1), (5, 1), (7, 1), (9, 1)]);
        assert!(p.is_empty());
        for c in [3, 4, 1, 2] {
            p.add(c);
        }
        assert_eq!(p.take_merged(), vec![(1, 4)]);
    }

    #[test]
    fn defaults_follow_qemu() {
        let unmap = DiscardOptions::default();
        let ignore = DiscardOptions::ignore();
        assert!(DiscardKind::Request.passes(&unmap) && !DiscardKind::Request.passes(&ignore));
        assert!(DiscardKind::Snapshot.passes(&ignore));
        assert!(!DiscardKind::Other.passes(&unmap));
        assert!(DiscardKind::Always.passes(&ignore) && !DiscardKind::Never.passes(&unmap));
        let forced = DiscardOptions { pass_request: Some(true), pass_other: Some(true), ..ignore };
        assert!(DiscardKind::Request.passes(&forced) && DiscardKind::Other.passes(&forced));
    }
}
