//! [`Concat`]: several disks read as one, back to back (convert's multiple sources).
//!
//! Each part contributes its size rounded up to whole sectors, as qemu-img counts them; the
//! padding reads as zeros. The result is read-only.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::driver::{check_request, BlockDriver, Extent, ExtentKind, ResizeOptions, ZeroFlags};
use crate::error::{Error, Result};
use crate::info::ImageInfo;
use crate::storage::Storage;

/// Read-only concatenation of disks.
#[derive(Debug)]
pub struct Concat {
    parts: Vec<(u64, u64, Arc<dyn BlockDriver>)>, // (start, sector-rounded length, disk)
    size: u64,
    name: String,
}

impl Concat {
    /// Concatenates `parts` in order.
    pub fn new(parts: Vec<Arc<dyn BlockDriver>>) -> Result<Concat> {
        let mut v = Vec::with_capacity(parts.len());
        let mut start = 0u64;
        for p in parts {
            let len = p.size().div_ceil(512) * 512;
            v.push((start, len, p));
            start = start.checked_add(len).ok_or_else(|| Error::out_of_range("total size of the inputs overflows"))?;
        }
        let name = v.iter().map(|(_, _, p)| p.filename()).collect::<Vec<_>>().join("+");
        Ok(Concat { parts: v, size: start, name })
    }

    fn part_at(&self, offset: u64) -> Option<&(u64, u64, Arc<dyn BlockDriver>)> {
        let i = self.parts.partition_point(|(start, _, _)| *start <= offset);
        self.parts.get(i.checked_sub(1)?)
    }
}

impl BlockDriver for Concat {
    fn format(&self) -> &'static str {
        "concat"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_request(offset, crate::iov_len_mut(bufs), self.size)?;
        let mut pos = offset;
        for b in bufs.iter_mut() {
            let mut done = 0usize;
            while done < b.len() {
                let (start, len, part) =
                    self.part_at(pos).ok_or_else(|| Error::out_of_range("read past the inputs"))?;
                let in_part = pos - start;
                let n = ((len - in_part) as usize).min(b.len() - done);
                let real = part.size().saturating_sub(in_part).min(n as u64) as usize;
                if real > 0 {
                    part.read_at(in_part, &mut [IoSliceMut::new(&mut b[done..done + real])])?;
                }
                b[done + real..done + n].fill(0);
                done += n;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn write_at(&self, _offset: u64, _bufs: &[IoSlice<'_>]) -> Result<()> {
        Err(Error::read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(Error::read_only())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::read_only())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let (start, len, part) =
            self.part_at(offset).ok_or_else(|| Error::out_of_range("block status past the inputs"))?;
        let in_part = offset - start;
        let max = max_len.min(len - in_part);
        if in_part >= part.size() {
            return Ok(Extent::new(max, ExtentKind::Zero));
        }
        // Each part is flattened through its own backing chain: concatenation has no backing file.
        let (mut e, _) = crate::driver::chain_status(part.as_ref(), in_part, max.min(part.size() - in_part))?;
        e.host = None; // offsets of a part do not describe the whole
        if e.kind == ExtentKind::Unallocated {
            e.kind = ExtentKind::Zero;
        }
        Ok(e)
    }

    fn resize(&self, _new_size: u64, _opts: &ResizeOptions) -> Result<()> {
        Err(Error::read_only())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            filename: self.name.clone(),
            format: "concat".into(),
            virtual_size: self.size,
            ..ImageInfo::default()
        })
    }

    fn storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }
}
