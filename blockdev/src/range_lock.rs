//! [`RangeLock`]: mutual exclusion on ranges of numbers (bytes, clusters).
//!
//! Holders of overlapping ranges wait for each other; disjoint ranges proceed in parallel. Used to
//! serialise read-modify-write of direct-I/O windows and the allocation of guest clusters, where a
//! plain mutex would serialise unrelated requests.

use std::sync::{Condvar, Mutex};

/// A lock on half-open ranges `[start, end)`.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push((start, end));
        RangeGuard { lock: self, range: (start, end) }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn overlapping_holders_exclude_each_other() {
        let l = RangeLock::new();
        let inside = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let _g = l.lock(10, 20);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        let _a = l.lock(0, 10);
        let _b = l.lock(10, 20); // disjoint: does not block
    }
}
