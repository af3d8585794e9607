//! Writing compressed clusters (`convert -c`).
//!
//! Compressed data is packed byte-wise into host clusters as qemu packs it: a compressed cluster
//! starts where the previous one ended if it fits (or if the next host cluster is contiguous and
//! free), otherwise in a fresh cluster. Each host cluster's refcount counts the compressed clusters
//! that touch it. The data is written before the L2 entry points at it.

use std::io::IoSlice;

use blockdev::{CompressedWrite, Error, Result};

use crate::compress::compress;
use crate::driver::Qcow2;
use crate::entry::{COMPRESSED, OFFSET_MASK};
use crate::meta::Meta;

impl Meta {
    /// Allocates `size` bytes for compressed data; returns the host byte offset.
    fn alloc_bytes(&mut self, io: &dyn blockdev::Storage, size: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let mut offset = self.free_byte_offset;
        if offset != 0 && self.rc.get(io, offset / cs)? == self.rc.max_value() {
            offset = 0;
        }
        let free_in_cluster = if offset == 0 { 0 } else { cs - offset % cs };
        let mut fresh = false;
        if offset == 0 || free_in_cluster < size {
            // Spill into the next cluster only if it is the next free one; else start a new one.
            let next = self.rc.find_free_run(io, 1)? * cs;
            let got = self.alloc(io, 1)?;
            if offset == 0 || offset.div_ceil(cs) * cs != next || got != next {
                offset = got;
                fresh = true;
            }
        }
        // Every cluster the data touches counts one more reference; a freshly allocated cluster
        // already has its one, and so does the cluster the data spills into.
        if !fresh {
            self.rc.update(io, offset / cs, 1)?;
        }
        self.free_byte_offset = if (offset + size) % cs == 0 { 0 } else { offset + size };
        Ok(offset)
    }
}

impl CompressedWrite for Qcow2 {
    fn compressed_unit(&self) -> u64 {
        self.cluster_size()
    }

    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        compress(self.compression, data)
    }

    fn write_compressed(&self, offset: u64, data: &[u8], compressed: Option<&[u8]>) -> Result<()> {
        self.check_writable()?;
        if self.crypt_scheme.is_some() {
            // Compressed clusters are never encrypted: qemu refuses them in encrypted images.
            return Err(Error::unsupported("Compression and encryption not supported at the same time"));
        }
        self.note_change(offset, data.len() as u64)?;
        let cs = self.cluster_size();
        if offset % cs != 0 || data.len() as u64 != cs {
            return Err(Error::invalid_argument("compressed writes must cover exactly one aligned cluster"));
        }
        let Some(c) = compressed.filter(|_| !self.geo.data_file) else {
            let len = cs.min(self.disk_size().saturating_sub(offset)) as usize;
            return self.write_range(offset, &[IoSlice::new(&data[..len])]);
        };
        let gc = offset / cs;
        let _g = self.writes.lock(gc, gc + 1);
        let host = {
            let mut m = self.lock();
            let io = self.file.as_ref();
            let (e, _) = m.entry(io, gc)?;
            if e & (OFFSET_MASK | COMPRESSED) != 0 {
                return Err(Error::from_errno("write compressed", libc::EIO)
                    .with_message("Compression can't overwrite anything"));
            }
            let l1_index = gc / m.geo.l2_entries();
            m.writable_l2(io, l1_index)?;
            let host = m.alloc_bytes(io, c.len() as u64)?;
            if let Some(what) = m.overlaps_metadata(host, c.len() as u64) {
                return Err(m.corruption(io, true, format!("Preventing invalid write of compressed data on {what}")));
            }
            host
        };
        self.file.write_at(host, &[IoSlice::new(c)])?;
        let mut m = self.lock();
        let entry = m
            .geo
            .encode_compressed(host, c.len() as u64)
            .ok_or_else(|| Error::from_errno("write compressed", libc::EFBIG))?;
        m.set_entry(self.file.as_ref(), gc, entry, 0)
    }

    fn finish_compressed(&self) -> Result<()> {
        let len = self.file.len()?;
        let aligned = len.div_ceil(512) * 512;
        if aligned != len {
            self.file.set_len(aligned, blockdev::Prealloc::Off)?;
        }
        Ok(())
    }
}
