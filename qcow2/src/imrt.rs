//! The in-memory refcount table (IMRT) that `check` builds by counting every reference in the
//! image: the header, the active L1 table and what it maps, snapshot L1 tables and what they map,
//! the snapshot table, the refcount table and blocks, the encryption header and persistent
//! bitmaps. Each finding is reported in qemu-img's words.
//!
//! Memory: one counter per cluster of the file (bounded by [`MAX_IMRT_CLUSTERS`]); references past
//! the end of the file are reported, not counted, so a lying table cannot grow the array.

use blockdev::info::CheckReport;
use blockdev::{read_exact_at, Error, Result};

use crate::cache::get_u64;
use crate::entry::{Geometry, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use crate::meta::Meta;

/// Largest number of clusters `check` keeps counters for (4 GiB of counters at worst).
pub const MAX_IMRT_CLUSTERS: u64 = 1 << 30;

/// Refcount table entry bits that must be zero.
const REFT_RESERVED: u64 = 0x1ff;

/// Reference counts found by walking the image.
pub struct Imrt {
    /// One count per cluster.
    pub counts: Counts,
    /// Largest value a stored refcount can hold.
    pub max: u64,
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Length of the image file.
    pub file_len: u64,
}

/// Everything a walk needs to report into.
pub struct Sink<'a> {
    /// Receives finding messages.
    pub report: &'a mut dyn FnMut(&str),
    /// Counts findings.
    pub res: &'a mut CheckReport,
    /// Set when the refcount structure must be rebuilt.
    pub rebuild: bool,
    /// Collect fragmentation statistics (active L1 only).
    pub frag: bool,
    /// Repair what can be repaired in place (`-r all`).
    pub fix_errors: bool,
    /// L2 entries to rewrite: (file offset of the entry, new first word), for the caller to
    /// write once the walk is over.
    pub l2_fixes: Vec<(u64, u64)>,
}

impl Imrt {
    /// An empty table for a file of `file_len` bytes.
    pub fn new(file_len: u64, cluster_bits: u32, max: u64) -> Result<Imrt> {
        let n = file_len.div_ceil(1 << cluster_bits);
        if n > MAX_IMRT_CLUSTERS {
            return Err(Error::out_of_range("image file too large to check"));
        }
        let counts = if max <= u16::MAX as u64 {
            Counts::Narrow(vec![0; n as usize])
        } else {
            Counts::Wide(vec![0; n as usize])
        };
        Ok(Imrt { counts, max, cluster_bits, file_len })
    }

    /// Counts one reference to every cluster of `[offset, offset + size)`.
    pub fn inc(&mut self, sink: &mut Sink<'_>, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let cs = 1u64 << self.cluster_bits;
        if (offset + size).saturating_sub(self.file_len) >= cs {
            (sink.report)(&format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            sink.res.corruptions += 1;
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        for c in first..=last {
            if !self.counts.increment(c, self.max) {
                (sink.report)(&format!("ERROR: overflow cluster offset=0x{:x}", c << self.cluster_bits));
                (sink.report)("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
                sink.res.corruptions += 1;
            }
        }
    }

    /// Count of cluster `c`.
    pub fn get(&self, c: u64) -> u64 {
        self.counts.get(c)
    }
}

/// Per-cluster counts, two bytes each when the image's refcount width fits in 16 bits (as
/// qemu's check keeps them), else eight.
pub enum Counts {
    /// Counts of refcount widths up to 16 bits.
    Narrow(Vec<u16>),
    /// Counts of wider refcounts.
    Wide(Vec<u64>),
}

impl Counts {
    /// Number of clusters counted.
    pub fn len(&self) -> u64 {
        match self {
            Counts::Narrow(v) => v.len() as u64,
            Counts::Wide(v) => v.len() as u64,
        }
    }

    /// Count of cluster `c` (0 beyond the end).
    pub fn get(&self, c: u64) -> u64 {
        match self {
            Counts::Narrow(v) => v.get(c as usize).map_or(0, |&n| n as u64),
            Counts::Wide(v) => v.get(c as usize).copied().unwrap_or(0),
        }
    }

    /// Adds one to cluster `c`'s count (growing the table); false when it is already `max`.
    fn increment(&mut self, c: u64, max: u64) -> bool {
        let i = c as usize;
        match self {
            Counts::Narrow(v) => {
                if i >= v.len() {
                    v.resize(i + 1, 0);
                }
                if v[i] as u64 >= max {
                    return false;
                }
                v[i] += 1;
            }
            Counts::Wide(v) => {
                if i >= v.len() {
                    v.resize(i + 1, 0);
                }
                if v[i] >= max {
                    return false;
                }
                v[i] += 1;
            }
        }
        true
    }

    /// The counts as eight-byte values (for rebuilding the refcount structure).
    pub fn to_wide(&self) -> Vec<u64> {
        match self {
            Counts::Narrow(v) => v.iter().map(|&n| n as u64).collect(),
            Counts::Wide(v) => v.clone(),
        }
    }
}

/// Counts the L1 table at `l1_offset` and everything below it.
pub fn walk_l1(
    m: &Meta,
    io: &dyn blockdev::Storage,
    imrt: &mut Imrt,
    sink: &mut Sink<'_>,
    l1: &[u64],
    l1_offset: u64,
) -> Result<()> {
    let cs = m.cluster_size();
    imrt.inc(sink, l1_offset, l1.len() as u64 * 8);
    let geo = m.geo;
    let mut table = vec![0u8; cs as usize];
    for &e in l1 {
        if e & L1_RESERVED != 0 {
            (sink.report)(&format!("ERROR found L1 entry with reserved bits set: {e:x}"));
            sink.res.corruptions += 1;
        }
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        imrt.inc(sink, l2, cs);
        if l2 % cs != 0 {
            (sink.report)(&format!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"));
            sink.res.corruptions += 1;
            continue;
        }
        if let Err(e) = read_exact_at(io, l2, &mut table) {
            (sink.report)("ERROR: I/O error in check_refcounts_l2");
            sink.res.check_errors += 1;
            return Err(e);
        }
        walk_l2(&geo, imrt, sink, &table, l2);
    }
    Ok(())
}

fn walk_l2(geo: &Geometry, imrt: &mut Imrt, sink: &mut Sink<'_>, table: &[u8], table_offset: u64) {
    let cs = geo.cluster_size();
    let entry_size = if geo.extended { 16 } else { 8 };
    let mut next_contiguous = 0u64;
    for j in 0..geo.l2_entries() as usize {
        let (mut e, bm) =
            if geo.extended { (get_u64(table, 2 * j), get_u64(table, 2 * j + 1)) } else { (get_u64(table, j), 0) };
        if e & COMPRESSED == 0 {
            let reserved = if geo.extended { L2_RESERVED | ZERO } else { L2_RESERVED };
            if e & reserved != 0 {
                (sink.report)(&format!("ERROR found l2 entry with reserved bits set: {e:x}"));
                sink.res.corruptions += 1;
            }
        }
        if e & COMPRESSED != 0 {
            if e & COPIED != 0 {
                let (o, _) = geo.compressed(e & !COPIED);
                (sink.report)(&format!(
                    "ERROR: coffset=0x{o:x}: copied flag must never be set for compressed clusters"
                ));
                e &= !COPIED;
                sink.res.corruptions += 1;
            }
            if geo.data_file {
                (sink.report)(&format!("ERROR compressed cluster {j} with data file, entry=0x{e:x}"));
                sink.res.corruptions += 1;
                continue;
            }
            if bm != 0 {
                (sink.report)(&format!(
                    "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry=0x{e:x}"
                ));
                sink.res.corruptions += 1;
                continue;
            }
            let (o, size) = geo.compressed(e);
            imrt.inc(sink, o, size);
            if sink.frag {
                sink.res.allocated_clusters = Some(sink.res.allocated_clusters.unwrap_or(0) + 1);
                sink.res.compressed_clusters = Some(sink.res.compressed_clusters.unwrap_or(0) + 1);
                sink.res.fragmented_clusters = Some(sink.res.fragmented_clusters.unwrap_or(0) + 1);
            }
            continue;
        }
        let host = e & OFFSET_MASK;
        let has_host = host != 0 || (geo.data_file && e & COPIED != 0);
        if !has_host {
            if bm & 0xffff_ffff != 0 {
                (sink.report)("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                sink.res.corruptions += 1;
            }
            continue;
        }
        if (bm >> 32) & bm != 0 {
            sink.res.corruptions += 1;
            (sink.report)(&format!(
                "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ));
        }
        if host % cs != 0 {
            sink.res.corruptions += 1;
            let data = if geo.extended { bm & 0xffff_ffff != 0 } else { e & ZERO == 0 };
            if data {
                (sink.report)(&format!(
                    "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
            } else {
                let verb = if sink.fix_errors { "Repairing" } else { "ERROR" };
                (sink.report)(&format!(
                    "{verb} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                ));
                if sink.fix_errors {
                    // Nothing is stored there: the entry becomes a zero cluster (extended
                    // entries keep their zero bits) and the host cluster is not counted.
                    let fixed = if geo.extended { 0 } else { ZERO };
                    sink.l2_fixes.push((table_offset + j as u64 * entry_size, fixed));
                    sink.res.corruptions -= 1;
                    sink.res.corruptions_fixed += 1;
                    continue;
                }
            }
        }
        if sink.frag {
            sink.res.allocated_clusters = Some(sink.res.allocated_clusters.unwrap_or(0) + 1);
            if next_contiguous != 0 && host != next_contiguous {
                sink.res.fragmented_clusters = Some(sink.res.fragmented_clusters.unwrap_or(0) + 1);
            }
            next_contiguous = host + cs;
        }
        if !geo.data_file {
            imrt.inc(sink, host, cs);
        }
    }
}

/// Counts the snapshot table (as the check read it into `m.snapshots`) and each snapshot's L1
/// tree.
pub fn walk_snapshots(m: &Meta, io: &dyn blockdev::Storage, imrt: &mut Imrt, sink: &mut Sink<'_>) -> Result<()> {
    let cs = m.cluster_size();
    for sn in &m.snapshots {
        let (id, name) = (&sn.id, &sn.name);
        let (l1_off, l1_size) = (sn.l1_offset, sn.l1_size as u64);
        if l1_off % cs != 0 {
            (sink.report)(&format!(
                "ERROR snapshot {id} ({name}) l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
            ));
            sink.res.corruptions += 1;
            continue;
        }
        if l1_size * 8 > crate::limits::MAX_L1_SIZE {
            (sink.report)(&format!(
                "ERROR snapshot {id} ({name}) l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"
            ));
            sink.res.corruptions += 1;
            continue;
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        read_exact_at(io, l1_off, &mut raw)?;
        let table: Vec<u64> = (0..l1_size as usize).map(|k| get_u64(&raw, k)).collect();
        let frag = std::mem::replace(&mut sink.frag, false);
        walk_l1(m, io, imrt, sink, &table, l1_off)?;
        sink.frag = frag;
    }
    if m.h.nb_snapshots > 0 {
        imrt.inc(sink, m.h.snapshots_offset, m.snapshots_size);
    }
    Ok(())
}

/// Counts the persistent bitmaps: the directory and each bitmap's table and data clusters. A
/// directory or table that cannot be read, or a table entry breaking the rules, is a corruption.
pub fn walk_bitmaps(m: &Meta, io: &dyn blockdev::Storage, imrt: &mut Imrt, sink: &mut Sink<'_>) -> Result<()> {
    let Some(ext) = &m.exts.bitmaps else { return Ok(()) };
    let cs = m.cluster_size();
    imrt.inc(sink, ext.directory_offset, ext.directory_size);
    let Ok(list) = crate::bitmap::dir::read_directory(io, ext, cs, m.h.size) else {
        sink.res.corruptions += 1;
        return Ok(());
    };
    for e in &list {
        imrt.inc(sink, e.table_offset, e.table_size as u64 * 8);
        let mut t = vec![0u8; e.table_size as usize * 8];
        if read_exact_at(io, e.table_offset, &mut t).is_err() {
            sink.res.corruptions += 1;
            continue;
        }
        for k in 0..e.table_size as usize {
            let entry = get_u64(&t, k);
            if !crate::bitmap::table_entry_is_valid(entry, cs) {
                sink.res.corruptions += 1;
                continue;
            }
            let o = crate::bitmap::table_entry_offset(entry);
            if o != 0 {
                imrt.inc(sink, o, cs);
            }
        }
    }
    Ok(())
}

/// Counts the refcount blocks and checks their table entries.
pub fn walk_refblocks(m: &Meta, imrt: &mut Imrt, sink: &mut Sink<'_>) {
    let cs = m.cluster_size();
    for (i, &raw) in m.rc.table.iter().enumerate() {
        let off = raw & OFFSET_MASK;
        if raw & REFT_RESERVED != 0 {
            (sink.report)(&format!("ERROR refcount table entry {i} has reserved bits set"));
            sink.res.corruptions += 1;
            sink.rebuild = true;
            continue;
        }
        if off % cs != 0 {
            (sink.report)(&format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
            sink.res.corruptions += 1;
            sink.rebuild = true;
            continue;
        }
        if off != 0 && off / cs >= imrt.file_len.div_ceil(cs) {
            sink.res.corruptions += 1;
            (sink.report)(&format!("ERROR refcount block {i} is outside image"));
            sink.rebuild = true;
            continue;
        }
        if off != 0 {
            imrt.inc(sink, off, cs);
            let c = imrt.get(off / cs);
            if c != 1 {
                (sink.report)(&format!("ERROR refcount block {i} refcount={c}"));
                sink.res.corruptions += 1;
                sink.rebuild = true;
            }
        }
    }
}
