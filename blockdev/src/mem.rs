//! [`MemStorage`]: a container in memory, for tests, fuzzing and images built on the fly.
//!
//! It keeps the [`Storage`] contracts (reads past the end are zeros, writes grow it) and records how
//! many times it was flushed, so tests can check that drivers flush where they must.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::error::{Error, Result};
use crate::storage::{checked_end, Prealloc, Storage};

/// A growable byte vector behind a lock, as a [`Storage`].
#[derive(Debug)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    name: String,
    read_only: bool,
    flushes: AtomicU64,
    /// Refuse to grow beyond this many bytes (so hostile inputs cannot exhaust memory).
    limit: u64,
}

impl MemStorage {
    /// A writable container holding `bytes`, growing to at most 1 GiB.
    pub fn new(name: &str, bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(bytes),
            name: name.to_string(),
            read_only: false,
            flushes: AtomicU64::new(0),
            limit: 1 << 30,
        }
    }

    /// A read-only container holding `bytes`.
    pub fn read_only(name: &str, bytes: Vec<u8>) -> MemStorage {
        MemStorage { read_only: true, ..MemStorage::new(name, bytes) }
    }

    /// Sets the size limit.
    pub fn with_limit(mut self, limit: u64) -> MemStorage {
        self.limit = limit;
        self
    }

    /// A copy of the current bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn grow_to(&self, v: &mut Vec<u8>, end: u64) -> Result<()> {
        if end > self.limit {
            return Err(Error::from_errno("write", libc::EFBIG).with_path(&self.name));
        }
        if end as usize > v.len() {
            v.resize(end as usize, 0);
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only().with_path(&self.name));
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let v = self.data.read().unwrap_or_else(|p| p.into_inner());
        let mut pos = offset;
        for b in bufs.iter_mut() {
            checked_end(pos, b.len() as u64)?;
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = usize::try_from(pos + i as u64).ok().and_then(|p| v.get(p)).copied().unwrap_or(0);
            }
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.writable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = checked_end(offset, total)?;
        let mut v = self.data.write().unwrap_or_else(|p| p.into_inner());
        self.grow_to(&mut v, end)?;
        let mut pos = offset as usize;
        for b in bufs {
            v[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn set_len(&self, len: u64, _prealloc: Prealloc) -> Result<()> {
        self.writable()?;
        let mut v = self.data.write().unwrap_or_else(|p| p.into_inner());
        if len > v.len() as u64 {
            self.grow_to(&mut v, len)?;
        } else {
            v.truncate(len as usize);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.writable()?;
        let end = checked_end(offset, len)?;
        let mut v = self.data.write().unwrap_or_else(|p| p.into_inner());
        self.grow_to(&mut v, end)?;
        v[offset as usize..end as usize].fill(0);
        Ok(())
    }

    fn zero_without_writing(&self, offset: u64, len: u64) -> bool {
        self.write_zeroes(offset, len, false).is_ok()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut v = self.data.write().unwrap_or_else(|p| p.into_inner());
        let end = checked_end(offset, len)?.min(v.len() as u64);
        if offset < end {
            v[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }

    fn data_status(&self, _offset: u64, max_len: u64) -> Result<(bool, u64)> {
        Ok((true, max_len))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn has_zero_init(&self) -> bool {
        true
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn protocol(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{read_exact_at, write_all_at};

    #[test]
    fn grows_reads_zero_past_end_and_respects_limit() {
        let m = MemStorage::new("m", vec![1, 2, 3]).with_limit(16);
        let mut b = [9u8; 6];
        read_exact_at(&m, 1, &mut b).unwrap();
        assert_eq!(b, [2, 3, 0, 0, 0, 0]);
        write_all_at(&m, 8, &[7, 7]).unwrap();
        assert_eq!(m.len().unwrap(), 10);
        assert!(write_all_at(&m, 15, &[1, 1]).is_err());
        let ro = MemStorage::read_only("r", vec![]);
        assert_eq!(write_all_at(&ro, 0, &[1]).unwrap_err().kind(), crate::ErrorKind::ReadOnly);
    }
}
