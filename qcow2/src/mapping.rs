//! qcow2 on the mapping core ([`blockdev::mapped`]): where a guest range lives, and how a guest
//! range becomes writable. The core does the I/O (scatter-gather, backing reads, zero fill,
//! copy-on-write, sector read-modify-write of encrypted images, block status); this module turns
//! L2 entries into [`Mapping`]s and `write.rs`'s write plans into [`WritePlan`]s.
//!
//! Mapping kinds: data clusters are [`Mapping::Data`] (through `blockdev::crypto::EncryptedRun` in an
//! encrypted image); zero clusters and unallocated clusters are [`Mapping::Zero`] and
//! [`Mapping::Unallocated`], or [`Mapping::Reserved`] when the entry keeps a host cluster
//! (preallocated zero clusters, unallocated subclusters of an allocated cluster); compressed
//! clusters are [`Mapping::Compressed`], decompressed here.
//!
//! Invariants: a planned write holds its guest clusters in the driver's range lock (inside the
//! pending value) from the lookup to the publication of its L2 entries, so no other request
//! allocates, frees or rewrites them in between; L2 entries are changed only in
//! [`MappedImage::commit_write`], after the data is written (crash rule 1); fresh clusters of a
//! plan that is dropped uncommitted (a failed data write) are queued for freeing, never
//! published.

use std::io::IoSliceMut;
use std::sync::Arc;

use blockdev::mapped::{
    DataWritten, Fill, FillSource, Granularity, Holes, Mapped, MappedImage, Mapping, Unwritten, WritePlan,
};
use blockdev::range_lock::RangeGuard;
use blockdev::{iov_len_mut, Error, Result, Storage};

use crate::discard::DiscardKind;
use crate::driver::{Qcow2, ReadGuard};
use crate::entry::Sub;
use crate::write::Step;
use blockdev::mapped::iov;

/// A planned qcow2 write, from [`MappedImage::prepare_write`] to its commit.
pub struct PendingWrite<'a> {
    image: &'a Qcow2,
    /// The guest clusters the write touches, held until the L2 entries are published.
    _clusters: RangeGuard<'a>,
    /// Held while a copy-on-write fill reads old clusters, as any read is (frees wait for it).
    reading: Option<ReadGuard<'a>>,
    publish: Publish,
}

/// What a commit publishes.
enum Publish {
    /// Data written in place; with extended L2 entries, the bitmap change that makes the
    /// written subclusters data (guest cluster, entry, new bitmap).
    InPlace(Option<(u64, u64, u64)>),
    /// Guest clusters `[gc, gc + count)` now in the host clusters from `host`; `old` are their
    /// previous entries, `fresh` whether the host clusters were newly allocated.
    Allocated { pos: u64, n: u64, gc: u64, count: u64, host: u64, fresh: bool, old: Vec<(u64, u64)> },
    /// Committed (or nothing to do).
    Done,
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        // A plan dropped before its commit: the data write failed. Fresh clusters go back.
        if let Publish::Allocated { count, host, fresh: true, .. } = self.publish {
            if !self.image.geo.data_file {
                self.image.lock().queue_free(host, count, DiscardKind::Never);
            }
        }
    }
}

impl Qcow2 {
    /// The data file seen as plain guest bytes around host `host`, which holds guest `guest`.
    fn data_run(&self, host: u64, guest: u64) -> Arc<dyn Storage> {
        if self.crypt_scheme.is_none() {
            return self.data.clone();
        }
        Arc::new(crate::crypt::data_run(self.cipher.as_ref(), self.data.clone(), host, guest))
    }

    /// The sector lock of an encrypted image (whose writes cover whole sectors).
    pub(crate) fn crypt_granularity(encrypted: bool) -> Option<Granularity> {
        encrypted.then(|| Granularity::new(blockdev::crypto::SECTOR_SIZE as u64))
    }

    /// The guest range a fresh run writes whole: the touched clusters, or with extended L2
    /// entries only the touched subclusters when no old data has to move along.
    fn fill_range(&self, pos: u64, n: u64, gc: u64, count: u64, fresh: bool, old: &[(u64, u64)]) -> (u64, u64) {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let keeps_data = fresh
            && old.iter().any(|&(e, b)| {
                e & crate::entry::COMPRESSED != 0
                    || (0..32).any(|s| matches!(geo.subcluster(e, b, s), Sub::Data { .. }))
            });
        if geo.extended && !keeps_data {
            let sc = geo.subcluster_size();
            (pos / sc * sc, (pos + n).div_ceil(sc) * sc)
        } else {
            (gc * cs, (gc + count) * cs)
        }
    }
}

impl MappedImage for Qcow2 {
    type Pending<'a> = PendingWrite<'a>;

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let (sub, run) = self.lock().map(self.file.as_ref(), offset, max_len)?;
        let within = offset % self.cluster_size();
        let mapping = match sub {
            Sub::Data { host, .. } => Mapping::Data {
                storage: self.data_run(host + within, offset),
                offset: host + within,
                holes: if self.metadata_preallocated_known() { Holes::AllocatedZeros } else { Holes::Ignored },
            },
            Sub::Zero { host: Some(h) } => {
                Mapping::Reserved { storage: self.data.clone(), offset: h + within, reads: Unwritten::Zeros }
            }
            Sub::Zero { host: None } => Mapping::Zero,
            Sub::Unallocated { host: Some(h) } => {
                Mapping::Reserved { storage: self.data.clone(), offset: h + within, reads: Unwritten::Backing }
            }
            Sub::Unallocated { host: None } => Mapping::Unallocated,
            // Compressed data has no plain bytes in the file to point at.
            Sub::Compressed { .. } => Mapping::Compressed { host: None },
            Sub::Invalid(why) => return Err(Error::corrupt(why)),
        };
        Ok(Mapped::new(run.clamp(1, max_len), mapping))
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<PendingWrite<'_>>> {
        let cs = self.cluster_size();
        let clusters = self.writes.lock(offset / cs, (offset + len - 1) / cs + 1);
        let step = {
            let mut m = self.lock();
            self.plan(&mut m, offset, len)?
        };
        let pending = |reading, publish| PendingWrite { image: self, _clusters: clusters, reading, publish };
        Ok(match step {
            Step::InPlace { host, len: n, update } => WritePlan {
                len: n,
                storage: self.data_run(host, offset),
                host,
                fill: None,
                pending: pending(None, Publish::InPlace(update)),
            },
            Step::Allocate { gc, count, host, fresh, old } => {
                let n = ((gc + count) * cs - offset).min(len);
                let (start, end) = self.fill_range(offset, n, gc, count, fresh, &old);
                let zeros = fresh && self.old_reads_as_zeros(&old);
                let fill = Fill {
                    guest_start: start,
                    host_start: host + (start - gc * cs),
                    len: end - start,
                    source: if zeros { FillSource::Zeros } else { FillSource::Current },
                    fresh_space: fresh && !self.geo.data_file,
                };
                let at = host + (offset - gc * cs);
                let reading = (!zeros).then(|| self.reading());
                WritePlan {
                    len: n,
                    storage: self.data_run(at, offset),
                    host: at,
                    fill: Some(fill),
                    pending: pending(reading, Publish::Allocated { pos: offset, n, gc, count, host, fresh, old }),
                }
            }
        })
    }

    fn commit_write(&self, mut pending: PendingWrite<'_>, _written: DataWritten) -> Result<()> {
        // The fill is read: frees need not wait for this write any more.
        pending.reading = None;
        match std::mem::replace(&mut pending.publish, Publish::Done) {
            Publish::InPlace(Some((gc, entry, bitmap))) => self.lock().set_entry(self.file.as_ref(), gc, entry, bitmap),
            Publish::InPlace(None) | Publish::Done => Ok(()),
            Publish::Allocated { pos, n, gc, host, fresh, old, .. } => self.point_at_new(pos, n, gc, host, fresh, &old),
        }
    }

    fn read_compressed(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let cs = self.cluster_size();
        let len = iov_len_mut(bufs);
        let mut cluster = vec![0u8; cs as usize];
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let within = pos % cs;
            let n = (cs - within).min(len - done);
            let (sub, _) = self.lock().map(self.file.as_ref(), pos, n)?;
            if let Sub::Compressed { offset: coff, size } = sub {
                self.decompress_cluster(coff, size, &mut cluster)?;
                iov::copy_into(bufs, done, &cluster[within as usize..(within + n) as usize]);
            } else {
                // A write replaced the cluster since the core looked: read what is there now.
                iov::with_range_mut(bufs, done, n, |part| blockdev::mapped::read_mapped(self, pos, part))?;
            }
            done += n;
        }
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        if self.crypt_scheme.is_some() && self.cipher.is_none() {
            return Err(crate::crypt::key_required());
        }
        Ok(())
    }

    fn granularity(&self) -> Option<&Granularity> {
        self.crypt_sectors.as_ref()
    }
}
