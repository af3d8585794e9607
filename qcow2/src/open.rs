//! Opening an image: every header field is validated against the file and the limits before any
//! table is read, in the order qemu checks them so the same broken image gets the same message.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use blockdev::range_lock::RangeLock;
use blockdev::{
    read_exact_at, resolve_reference, BlockDriver, Chain, Error, MetadataCacheSizes, OpenOptions, Opener, Result,
    Storage,
};

use crate::cache::{get_u64, TableCache};
use crate::driver::{BackingInfo, Qcow2};
use crate::entry::{Geometry, OFFSET_MASK};
use crate::header::{autoclear, backing_fields, incompat, parse_extensions, unsupported_features_message, Header};
use crate::limits::*;
use crate::meta::Meta;
use crate::refcount::Refcounts;

/// Size of a snapshot table entry's fixed part (for the table size check).
const SNAPSHOT_HEADER_SIZE: u64 = 40;

/// qemu's `qcow2_validate_table`: entry count against a byte limit, offset alignment and range.
fn validate_table(offset: u64, entries: u64, entry_len: u64, max_bytes: u64, cs: u64, name: &str) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::from_errno("open", libc::EFBIG).with_message(format!("{name} too large")));
    }
    let bytes = entries * entry_len;
    if (i64::MAX as u64) - bytes < offset || offset % cs != 0 {
        return Err(Error::invalid_image(format!("{name} offset invalid")));
    }
    Ok(())
}

impl Qcow2 {
    /// Opens a qcow2 image from `file`.
    pub fn open(file: Arc<dyn Storage>, opts: &OpenOptions, chain: &Chain, opener: &dyn Opener) -> Result<Arc<Qcow2>> {
        let file_len = file.len()?;
        let mut head = vec![0u8; 4096.min(file_len.max(72)) as usize];
        read_exact_at(file.as_ref(), 0, &mut head)?;
        let h = Header::parse(&head)?;
        let cs = h.cluster_size();
        let mut first = vec![0u8; cs as usize];
        read_exact_at(file.as_ref(), 0, &mut first)?;
        let (bo, bsz) = backing_fields(&first);
        if bo > cs {
            return Err(Error::invalid_image("Invalid backing file offset"));
        }
        let exts = parse_extensions(&h, &first, bo, bsz)?;
        let unknown = h.incompatible & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(unsupported_features_message(&exts, unknown)));
        }
        let mut writable = !opts.read_only && !file.is_read_only();
        if h.incompatible & incompat::CORRUPT != 0 && writable && !opts.for_check {
            return Err(Error::from_errno("open", libc::EACCES)
                .with_message("qcow2: Image is corrupt; cannot be opened read/write"));
        }
        if h.extended_l2() && h.cluster_bits < 14 {
            return Err(Error::invalid_image(format!("Unsupported subcluster size: {}", cs / 32)));
        }
        if h.crypt_method > 2 {
            return Err(Error::invalid_image(format!("Unsupported encryption method: {}", h.crypt_method)));
        }
        let (crypt_scheme, cipher) = crate::crypt::open(&h, &exts, file.as_ref(), opts)?;
        if h.refcount_table_clusters == 0 && !opts.for_check {
            return Err(Error::invalid_image("Image does not contain a reference count table"));
        }
        validate_table(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
            cs,
            MAX_REFTABLE_SIZE,
            cs,
            "Reference count table",
        )?;
        if !opts.for_check {
            validate_table(
                h.snapshots_offset,
                h.nb_snapshots as u64,
                SNAPSHOT_HEADER_SIZE,
                SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
                cs,
                "Snapshot table",
            )?;
        }
        validate_table(h.l1_table_offset, h.l1_size as u64, 8, MAX_L1_SIZE, cs, "Active L1 table")?;
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended: h.extended_l2(),
            data_file: h.incompatible & incompat::DATA_FILE != 0,
        };
        let l1_needed = geo.l1_entries_for(h.size);
        if l1_needed > i32::MAX as u64 {
            return Err(Error::from_errno("open", libc::EFBIG).with_message("Image is too big"));
        }
        if (h.l1_size as u64) < l1_needed {
            return Err(Error::invalid_image("L1 table is too small"));
        }
        let mut raw = vec![0u8; h.l1_size as usize * 8];
        read_exact_at(file.as_ref(), h.l1_table_offset, &mut raw).map_err(|e| e.prefixed("Could not read L1 table"))?;
        let l1: Vec<u64> = (0..h.l1_size as usize).map(|i| get_u64(&raw, i)).collect();
        let (l2_tables, rc_tables) = cache_tables(&opts.metadata_cache, &geo, h.size, l1.len() as u64)?;
        let rc = Refcounts::load(
            file.as_ref(),
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
            h.refcount_order,
            h.cluster_bits,
            rc_tables,
        )?;

        // External data file.
        let data: Arc<dyn Storage> = if geo.data_file && !opts.no_io {
            // A data file given with the open options (`data-file.filename`) wins over the
            // recorded name, and is a path of its own (not relative to the image).
            match (&opts.data_file, &exts.data_file) {
                (Some(given), _) => opener.open_storage("", given, opts)?,
                (None, Some(name)) => opener.open_storage(file.name(), name, opts)?,
                (None, None) => return Err(Error::invalid_argument("'data-file' is required for this image")),
            }
        } else {
            file.clone()
        };
        if !geo.data_file && h.autoclear & autoclear::DATA_FILE_RAW != 0 {
            return Err(Error::invalid_image("data-file-raw requires a data file"));
        }

        // Backing file.
        let mut backing_info =
            BackingInfo { name: exts.backing_file.clone(), full: None, format: exts.backing_format.clone() };
        let mut backing: Option<Arc<dyn BlockDriver>> = None;
        if let Some(name) = &exts.backing_file {
            backing_info.full = Some(resolve_reference(file.name(), name));
            if !opts.no_backing {
                let b = opener
                    .open_image(file.name(), name, exts.backing_format.as_deref(), &opts.for_backing(), chain)
                    .map_err(|e| e.prefixed("Could not open backing file"))?;
                backing = Some(b);
            }
        }

        let lazy = writable && h.compatible & crate::header::compat::LAZY_REFCOUNTS != 0;
        let dirty = h.incompatible & incompat::DIRTY != 0;
        let external_data = (!Arc::ptr_eq(&data, &file)).then(|| data.clone());
        let l2_set: HashSet<u64> = l1.iter().map(|e| e & OFFSET_MASK).filter(|o| *o != 0).collect();
        let mut meta = Meta {
            h,
            exts,
            geo,
            l1,
            external_data,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(l2_tables),
            rc,
            frees: Vec::new(),
            l2_tables: l2_set,
            lazy,
            dirty_on_disk: dirty,
            writable,
            corruption_reported: false,
            free_byte_offset: 0,
            snapshots: Vec::new(),
            snapshots_size: 0,
            bitmaps: Vec::new(),
            discard: opts.discard,
        };
        if !opts.for_check {
            // (check reads the table itself, repairing what it can.)
            let (off, nb, size) = (meta.h.snapshots_offset, meta.h.nb_snapshots, meta.h.size);
            let table = crate::snapshot::read_table(file.as_ref(), off, nb, size, false, &mut |_| {})?;
            meta.snapshots = table.entries;
            meta.snapshots_size = table.size;
        }
        if let Some(ext) = meta.exts.bitmaps {
            match crate::bitmap::dir::read_directory(file.as_ref(), &ext, geo.cluster_size(), meta.h.size) {
                Ok(list) => meta.bitmaps = list,
                // check walks and judges the bitmaps itself.
                Err(_) if opts.for_check => {}
                Err(e) => return Err(e),
            }
        }
        meta.check_l1().or_else(|e| if opts.for_check { Ok(()) } else { Err(e) })?;
        // Autoclear bits vdisk does not maintain must be cleared before the first write.
        if writable {
            let keep = autoclear::DATA_FILE_RAW | autoclear::BITMAPS;
            if meta.h.autoclear & !keep != 0 || meta.exts.stale_bitmaps {
                meta.h.autoclear &= keep;
                // Dropping stale bitmaps removes an extension: the whole header is rewritten.
                meta.write_header(file.as_ref(), meta.exts.stale_bitmaps)?;
                file.flush()?;
            }
        }
        meta.rc.free_hint = 0;
        let size = meta.h.size;
        let compression = meta.h.compression();
        let repair_needed = dirty && writable && !opts.for_check;
        if opts.read_only {
            writable = false;
            meta.writable = false;
        }
        let q = Arc::new(Qcow2 {
            file,
            data,
            backing,
            meta: Mutex::new(meta),
            writes: RangeLock::new(),
            size: AtomicU64::new(size),
            geo,
            compression,
            read_only: !writable,
            reads_in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            backing_info,
            metadata_prealloc: std::sync::atomic::AtomicU8::new(0),
            recording: Mutex::new(None),
            watch_bitmaps: AtomicBool::new(false),
            crypt_sectors: Qcow2::crypt_granularity(crypt_scheme.is_some()),
            crypt_scheme,
            cipher,
        });
        q.refresh_bitmap_watch(&q.lock());
        if repair_needed {
            // Lazy refcounts left the counts stale: rebuild them before anything is allocated.
            q.repair_after_crash(&opts.diagnostics).map_err(|e| e.prefixed("Could not repair dirty image"))?;
        }
        Ok(q)
    }
}

/// Numbers of L2 tables and refcount blocks to cache, from the requested sizes as qemu combines
/// `cache-size`, `l2-cache-size` and `refcount-cache-size`; without a request, vdisk's defaults.
/// Never more L2 tables than the image has, never fewer than the minimum.
fn cache_tables(req: &MetadataCacheSizes, geo: &Geometry, disk_size: u64, l1_len: u64) -> Result<(usize, usize)> {
    let cs = geo.cluster_size();
    let entry_size = if geo.extended { 16 } else { 8 };
    let max_l2_bytes = disk_size.div_ceil(cs).saturating_mul(entry_size).div_ceil(cs).saturating_mul(cs);
    let min_rc_bytes = MIN_CACHE_TABLES as u64 * cs;
    let invalid = |msg: &str| Err(Error::invalid_argument(msg.to_string()));
    let (l2, rc) = match (req.total, req.l2, req.refcount) {
        (None, None, None) => (DEFAULT_L2_CACHE_BYTES, DEFAULT_REFCOUNT_CACHE_BYTES),
        (Some(_), Some(_), Some(_)) => {
            return invalid("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        }
        (Some(total), Some(l2), None) if l2 > total => return invalid("l2-cache-size may not exceed cache-size"),
        (Some(total), None, Some(rc)) if rc > total => return invalid("refcount-cache-size may not exceed cache-size"),
        (Some(total), Some(l2), None) => (l2, total - l2),
        (Some(total), None, Some(rc)) => (total - rc, rc),
        (Some(total), None, None) => {
            let l2 = max_l2_bytes.min(total.saturating_sub(min_rc_bytes));
            (l2, total - l2)
        }
        (None, l2, rc) => (l2.unwrap_or(DEFAULT_L2_CACHE_BYTES), rc.unwrap_or(DEFAULT_REFCOUNT_CACHE_BYTES)),
    };
    let l2_tables = (l2 / cs).min(l1_len + 1).clamp(MIN_CACHE_TABLES as u64, 1 << 20);
    let rc_tables = (rc / cs).clamp(MIN_CACHE_TABLES as u64, 1 << 20);
    Ok((l2_tables as usize, rc_tables as usize))
}
