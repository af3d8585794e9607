//! `measure`: the file size a qcow2 image needs for a given size or source image.
//!
//! The figures follow qemu's formula exactly (so scripts that preallocate volumes from it keep
//! working): the fully allocated size is the header cluster, L2 and L1 tables for the whole disk,
//! the refcount structure found by fixed-point iteration, and every data cluster; the required size
//! replaces the data part by the clusters the source actually has data in.

use blockdev::options::CreateOptions;
use blockdev::{chain_status, BlockDriver, Error, ExtentKind, Measure, Prealloc, Result};

use crate::create::params_for_measure;
use crate::limits::MAX_L1_SIZE;

/// Bytes of refcount table and blocks needed to count `clusters` clusters (including themselves).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let (blocks, table) = self_counting_refcounts(clusters, (cluster_size * 8) >> refcount_order, cluster_size / 8);
    (blocks + table) * cluster_size
}

/// The smallest numbers of refcount blocks and refcount table clusters that count `clusters`
/// clusters plus themselves, given entries per block and per table cluster.
pub(crate) fn self_counting_refcounts(clusters: u64, per_block: u64, per_table_cluster: u64) -> (u64, u64) {
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks, table);
        }
    }
}

/// Size of a fully allocated image of `total` bytes.
pub fn prealloc_size(total: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = total.div_ceil(cluster_size) * cluster_size;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).div_ceil(cluster_size / l2e) * (cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
    meta + aligned
}

/// `measure` for qcow2.
pub fn measure(size: u64, source: Option<&dyn BlockDriver>, opts: &CreateOptions) -> Result<Measure> {
    let p = params_for_measure(opts)?;
    let cs = 1u64 << p.cluster_bits;
    let l2e = if p.extended_l2 { 16 } else { 8 };
    let mut virtual_size = size.div_ceil(cs) * cs;
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables * 8 > MAX_L1_SIZE {
        return Err(Error::invalid_argument("The image size is too large (try using a larger cluster size)"));
    }
    let mut required = 0u64;
    if let Some(src) = source {
        let ssize = src.size();
        virtual_size = ssize.div_ceil(cs) * cs;
        if p.backing.is_some() {
            required = virtual_size;
        } else {
            let mut offset = 0u64;
            while offset < ssize {
                let (ext, _) =
                    chain_status(src, offset, ssize - offset).map_err(|e| e.prefixed("Unable to get block status"))?;
                let mut pnum = ext.len.max(1);
                if ext.kind == ExtentKind::Data {
                    pnum = (offset + pnum).div_ceil(cs) * cs - offset;
                    required += offset % cs + pnum;
                }
                offset += pnum;
            }
        }
    }
    if matches!(p.prealloc, Prealloc::Full | Prealloc::Falloc) {
        required = virtual_size;
    }
    let mut fully = prealloc_size(virtual_size, cs, p.refcount_order, p.extended_l2);
    // A LUKS area takes whole clusters of its own.
    if let Some(crate::create::Encryption::Luks(o, _)) = &p.encryption {
        fully += blockdev::crypto::volume::header_area_len(&o.spec).div_ceil(cs) * cs;
    }
    Ok(Measure {
        required: fully - virtual_size + required,
        fully_allocated: fully,
        bitmaps: if p.version >= 3 { source.map(|s| bitmaps_size(s, cs)).transpose()?.flatten() } else { None },
    })
}

/// Space the source's persistent bitmaps take when copied into an image with `cs`-byte clusters
/// (every bitmap fully allocated, its table, and the directory), or `None` when the source cannot
/// hold bitmaps (qemu asks the source: qcow2 version 3).
fn bitmaps_size(source: &dyn BlockDriver, cs: u64) -> Result<Option<u64>> {
    let Some(b) = source.bitmaps().filter(|b| b.supported()) else { return Ok(None) };
    let mut total = 0u64;
    let mut dir = 0u64;
    for bm in b.list()? {
        let clusters = blockdev::bitmap::DirtyBitmap::bytes_needed(bm.granularity, source.size()).div_ceil(cs);
        total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
        dir += crate::bitmap::dir::entry_size(bm.name.len());
    }
    Ok(Some(total + dir.div_ceil(cs) * cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_figures() {
        // qemu-img measure -O qcow2 --size 1G: required 393216, fully allocated 1074135040.
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1_074_135_040);
        let m = measure(1 << 30, None, &CreateOptions::new()).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393_216, 1_074_135_040));
    }
}
