//! A structured fuzzer for qcow2 metadata: it starts from a small valid image and applies a list of
//! targeted mutations to its L1, L2, refcount table and refcount block entries and its header
//! fields, then opens the result and walks it, checks it and repairs it.
//!
//! Base images: three made with the library at start-up (512-byte clusters v3, 1 KiB clusters v2,
//! 16 KiB clusters with extended L2 entries and 4-bit refcounts; each with data, zero clusters, a
//! discarded range and a compressed cluster, spread over several L2 tables and refcount blocks),
//! and the qcow2 images of `../testdata` (embedded), except those needing an external data file.
//!
//! Input layout (decoded with `arbitrary`): a byte choosing the base image (mod the number of
//! bases), a byte giving the number of mutations (mod 13), the mutations ([`Mutation`]), a byte
//! giving the number of guest writes (mod 5), the writes ([`Write`]). Running out of input ends
//! the lists early, so the seed `NN 00` is base image NN unchanged.
//!
//! Mutations address entries by index into the base image's own layout (the i-th L1 entry, the
//! j-th entry of the k-th L2 table in use, ...), so most of them hit metadata. Values are either
//! raw or chosen to be interesting: 0, 1, the end of the file, past it, the header, the L1 table,
//! the refcount table, a refcount block or L2 table (loops and aliasing), with flag bits (COPIED,
//! COMPRESSED, ZERO, reserved bits) added.
//!
//! What runs, and the invariants asserted (errors returned as values are always fine):
//! 1. a read-only open; block status over the whole disk (bounded to 256 extents): each extent is
//!    non-empty and within the request; reads of the extents (bounded to 8 MiB): a range reported
//!    as zero (or unallocated, with no backing file) reads as zeros; then `check` without repair;
//! 2. a writable open for check (as `qemu-img check -r all`) of a copy; `check -r all`; the
//!    repaired file reopened for check and checked twice: both checks give the same counts. (What
//!    the repair itself reports is not compared with them: as in qemu, the recount after a rebuild
//!    keeps only its leaks, which is why qemu-img double-checks a repaired image.)
//! 3. when that check is clean (no corruptions, no check errors; leaks are allowed): a normal writable open, the guest writes, and every written byte
//!    must read back as the last write that covered it; after closing, the image must still check
//!    clean. (Only repaired images get this: on an image with too-low refcounts, data clusters can
//!    legitimately alias, as they do in qemu.)
//!
//! Set `FUZZ_DEBUG=1` to print the decoded input (when reproducing a crash), and `FUZZ_DUMP=DIR` to
//! save the repaired image and the image after the guest writes there.
//!
//! Memory is bounded: every container is a `MemStorage` with a limit, reads are capped.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::{Arbitrary, Unstructured};
use blockdev::options::CreateOptions;
use blockdev::{
    BlockDriver, Chain, CheckReport, ExtentKind, Format, MemStorage, OpenOptions, Opener, ReferencePolicy, RepairMode,
    Result, Storage,
};
use libfuzzer_sys::fuzz_target;
use qcow2::header::Header;

/// Largest growth of a container (repairs append refcount structures).
const GROWTH_LIMIT: u64 = 32 << 20;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Zero,
    One,
    /// The file length.
    Eof,
    /// `n` clusters past the end of the file.
    PastEof(u8),
    /// Offset 0 (the header cluster), plus a byte offset.
    Header(u8),
    L1,
    RefTable,
    /// The n-th refcount block of the base image.
    RefBlock(u8),
    /// The n-th L2 table of the base image.
    L2(u8),
    /// Cluster number n.
    Cluster(u16),
    /// A small number (counts, bits, lengths).
    Small(u8),
    /// Offsets at the edges of what entries can hold.
    Huge(u8),
    Raw(u64),
}

/// Header fields (by their byte offset and width in the qcow2 header).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Field {
    Version,
    BackingFileOffset,
    BackingFileSize,
    ClusterBits,
    Size,
    CryptMethod,
    L1Size,
    L1TableOffset,
    RefcountTableOffset,
    RefcountTableClusters,
    NbSnapshots,
    SnapshotsOffset,
    IncompatibleFeatures,
    CompatibleFeatures,
    AutoclearFeatures,
    RefcountOrder,
    HeaderLength,
    CompressionType,
}

impl Field {
    fn at(self) -> (usize, usize) {
        match self {
            Field::Version => (4, 4),
            Field::BackingFileOffset => (8, 8),
            Field::BackingFileSize => (16, 4),
            Field::ClusterBits => (20, 4),
            Field::Size => (24, 8),
            Field::CryptMethod => (32, 4),
            Field::L1Size => (36, 4),
            Field::L1TableOffset => (40, 8),
            Field::RefcountTableOffset => (48, 8),
            Field::RefcountTableClusters => (56, 4),
            Field::NbSnapshots => (60, 4),
            Field::SnapshotsOffset => (64, 8),
            Field::IncompatibleFeatures => (72, 8),
            Field::CompatibleFeatures => (80, 8),
            Field::AutoclearFeatures => (88, 8),
            Field::RefcountOrder => (96, 4),
            Field::HeaderLength => (100, 4),
            Field::CompressionType => (104, 1),
        }
    }
}

/// One change to the base image.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mutation {
    /// Set L1 entry `index` (mod the L1 size) to `value` with `flags`.
    L1 { index: u16, value: Value, flags: u8 },
    /// Set 64-bit word `index` of the `table`-th L2 table (both words of extended entries).
    L2 { table: u8, index: u16, value: Value, flags: u8 },
    /// Set refcount table entry `index`.
    RefTable { index: u16, value: Value },
    /// Set 64-bit word `index` of the `block`-th refcount block (whatever the refcount width).
    RefBlock { block: u8, index: u16, value: Value },
    /// Set a header field (truncated to its width).
    Header { field: Field, value: Value },
    /// Flip one feature bit (0 incompatible, 1 compatible, 2 autoclear).
    FeatureBit { kind: u8, bit: u8 },
    /// Cut the file after `clusters` clusters.
    Truncate { clusters: u8 },
}

/// A guest write, for step 3.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Write {
    offset: u32,
    len: u16,
    byte: u8,
}

/// A base image and where its metadata lives.
struct Base {
    bytes: Vec<u8>,
    cs: u64,
    l1: (u64, u64),
    l2s: Vec<u64>,
    reftable: (u64, u64),
    refblocks: Vec<u64>,
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 8).map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}

impl Base {
    fn new(bytes: Vec<u8>) -> Base {
        let h = Header::parse(&bytes).expect("base image header");
        let cs = h.cluster_size();
        let mask = 0x00ff_ffff_ffff_fe00u64;
        let l1 = (h.l1_table_offset, h.l1_size as u64);
        let l2s = (0..l1.1).map(|i| be64(&bytes, l1.0 + 8 * i) & mask).filter(|&o| o != 0).collect();
        let reftable = (h.refcount_table_offset, h.refcount_table_clusters as u64 * cs / 8);
        let refblocks = (0..reftable.1).map(|i| be64(&bytes, reftable.0 + 8 * i) & !511).filter(|&o| o != 0).collect();
        Base { bytes, cs, l1, l2s, reftable, refblocks }
    }

    fn resolve(&self, v: Value, len: u64) -> u64 {
        let pick = |list: &[u64], n: u8| if list.is_empty() { 0 } else { list[n as usize % list.len()] };
        match v {
            Value::Zero => 0,
            Value::One => 1,
            Value::Eof => len,
            Value::PastEof(n) => len.next_multiple_of(self.cs) + n as u64 * self.cs,
            Value::Header(n) => n as u64,
            Value::L1 => self.l1.0,
            Value::RefTable => self.reftable.0,
            Value::RefBlock(n) => pick(&self.refblocks, n),
            Value::L2(n) => pick(&self.l2s, n),
            Value::Cluster(n) => n as u64 * self.cs,
            Value::Small(n) => n as u64,
            Value::Huge(n) => match n % 6 {
                0 => 1 << 55,
                1 => (1 << 56) - self.cs,
                2 => 1 << 56,
                3 => i64::MAX as u64 & !(self.cs - 1),
                4 => u64::MAX,
                _ => 1 << 40,
            },
            Value::Raw(x) => x,
        }
    }
}

fn entry_flags(flags: u8) -> u64 {
    let mut f = 0;
    if flags & 1 != 0 {
        f |= 1 << 63; // COPIED
    }
    if flags & 2 != 0 {
        f |= 1 << 62; // COMPRESSED
    }
    if flags & 4 != 0 {
        f |= 1; // ZERO (L2), reserved (L1)
    }
    if flags & 8 != 0 {
        f |= 1 << 56; // reserved
    }
    if flags & 16 != 0 {
        f |= 0x100; // reserved low bits
    }
    f
}

fn put(img: &mut Vec<u8>, at: u64, width: usize, value: u64) {
    let Ok(at) = usize::try_from(at) else { return };
    if at.saturating_add(width) > img.len() {
        return; // the entry is past a truncation
    }
    img[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
}

fn apply(base: &Base, m: Mutation, img: &mut Vec<u8>) {
    let len = img.len() as u64;
    let words = base.cs / 8;
    match m {
        Mutation::L1 { index, value, flags } => {
            if base.l1.1 > 0 {
                let at = base.l1.0 + 8 * (index as u64 % base.l1.1);
                put(img, at, 8, base.resolve(value, len) | entry_flags(flags));
            }
        }
        Mutation::L2 { table, index, value, flags } => {
            if !base.l2s.is_empty() {
                let t = base.l2s[table as usize % base.l2s.len()];
                put(img, t + 8 * (index as u64 % words), 8, base.resolve(value, len) | entry_flags(flags));
            }
        }
        Mutation::RefTable { index, value } => {
            if base.reftable.1 > 0 {
                put(img, base.reftable.0 + 8 * (index as u64 % base.reftable.1), 8, base.resolve(value, len));
            }
        }
        Mutation::RefBlock { block, index, value } => {
            if !base.refblocks.is_empty() {
                let b = base.refblocks[block as usize % base.refblocks.len()];
                put(img, b + 8 * (index as u64 % words), 8, base.resolve(value, len));
            }
        }
        Mutation::Header { field, value } => {
            let (at, width) = field.at();
            let v = base.resolve(value, len);
            let v = if width < 8 { v & ((1u64 << (8 * width)) - 1) } else { v };
            put(img, at as u64, width, v);
        }
        Mutation::FeatureBit { kind, bit } => {
            let at = 72 + 8 * (kind as u64 % 3);
            let old = be64(img, at);
            put(img, at, 8, old ^ (1 << (bit % 64)));
        }
        Mutation::Truncate { clusters } => {
            img.truncate((clusters as u64 * base.cs) as usize);
        }
    }
}

/// Parses the input.
fn parse(data: &[u8]) -> Option<(usize, Vec<Mutation>, Vec<Write>)> {
    let mut u = Unstructured::new(data);
    let base = u.arbitrary::<u8>().ok()? as usize;
    let mut muts = Vec::new();
    let n = u.arbitrary::<u8>().unwrap_or(0) % 13;
    for _ in 0..n {
        match u.arbitrary() {
            Ok(m) => muts.push(m),
            Err(_) => break,
        }
    }
    let mut writes = Vec::new();
    let n = u.arbitrary::<u8>().unwrap_or(0) % 5;
    for _ in 0..n {
        match u.arbitrary() {
            Ok(w) => writes.push(w),
            Err(_) => break,
        }
    }
    Some((base, muts, writes))
}

/// An opener that creates containers in memory (for building base images) and opens nothing.
#[derive(Default)]
struct MemOpener {
    created: Mutex<Vec<Arc<MemStorage>>>,
}

impl Opener for MemOpener {
    fn open_image(
        &self,
        _: &str,
        name: &str,
        _: Option<&str>,
        _: &OpenOptions,
        _: &Chain,
    ) -> Result<Arc<dyn BlockDriver>> {
        Err(blockdev::Error::unsupported(format!("not opening '{name}'")))
    }

    fn open_storage(&self, _: &str, name: &str, _: &OpenOptions) -> Result<Arc<dyn Storage>> {
        Err(blockdev::Error::unsupported(format!("not opening '{name}'")))
    }

    fn create_storage(&self, name: &str, _: &CreateOptions) -> Result<Arc<dyn Storage>> {
        let s = Arc::new(MemStorage::new(name, Vec::new()).with_limit(64 << 20));
        self.created.lock().unwrap().push(s.clone());
        Ok(s)
    }
}

/// Makes an image with the library: `opts` as for `qemu-img create -o`, then some guest I/O.
fn make(opts: &str) -> Vec<u8> {
    let opener = MemOpener::default();
    let fmt = qcow2::Qcow2Format;
    let mut o = CreateOptions::new();
    o.parse_into(opts, fmt.create_options()).expect("create options");
    fmt.create("base.qcow2", &o, &opener).expect("create");
    let storage = opener.created.lock().unwrap()[0].clone();
    let img = fmt.open(storage.clone(), &OpenOptions::read_write(), &Chain::new(), &opener).expect("open");
    let cs = img.cluster_size().unwrap();
    let size = img.size();
    let mut pattern = vec![0u8; 3 * cs as usize + 700];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    for at in [0, size / 3 + 100, size / 2, size - pattern.len() as u64] {
        img.write_at(at, &[IoSlice::new(&pattern)]).expect("write");
    }
    let z = blockdev::ZeroFlags { may_unmap: false, no_fallback: false };
    img.write_zeroes(cs, cs, z).expect("zeroes");
    img.discard(size / 2, cs).expect("discard");
    let c = img.compressed().expect("compressed writes");
    let unit = vec![7u8; c.compressed_unit() as usize];
    let packed = c.compress(&unit).expect("compress");
    c.write_compressed(size / 4 / cs * cs, &unit, packed.as_deref()).expect("write compressed");
    c.finish_compressed().expect("finish");
    img.close().expect("close");
    storage.snapshot()
}

fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        let mut v = vec![
            make("size=1M,cluster_size=512"),
            make("size=2M,cluster_size=1k,compat=0.10"),
            make("size=4M,cluster_size=16k,extended_l2=on,refcount_bits=4"),
        ];
        for b in [
            &include_bytes!("../../testdata/cluster4k.qcow2")[..],
            include_bytes!("../../testdata/v2.qcow2"),
            include_bytes!("../../testdata/extended-l2.qcow2"),
            include_bytes!("../../testdata/compressed-zlib.qcow2"),
            include_bytes!("../../testdata/compressed-zstd.qcow2"),
            include_bytes!("../../testdata/zero.qcow2"),
            include_bytes!("../../testdata/refcount1.qcow2"),
            include_bytes!("../../testdata/refcount64.qcow2"),
            include_bytes!("../../testdata/lazy-refcounts.qcow2"),
            include_bytes!("../../testdata/backing-overlay.qcow2"),
            include_bytes!("../../testdata/corrupt-leak.qcow2"),
            include_bytes!("../../testdata/corrupt-refcount-high.qcow2"),
            include_bytes!("../../testdata/corrupt-refcount-low.qcow2"),
            include_bytes!("../../testdata/corrupt-l2-eof.qcow2"),
        ] {
            v.push(b.to_vec());
        }
        v.into_iter().map(Base::new).collect()
    })
}

fn open(bytes: Vec<u8>, read_only: bool, for_check: bool) -> Option<(Arc<MemStorage>, Arc<qcow2::Qcow2>)> {
    open_result(bytes, read_only, for_check).ok()
}

fn open_result(bytes: Vec<u8>, read_only: bool, for_check: bool) -> Result<(Arc<MemStorage>, Arc<qcow2::Qcow2>)> {
    let limit = bytes.len() as u64 + GROWTH_LIMIT;
    let storage = Arc::new(MemStorage::new("fuzz.qcow2", bytes).with_limit(limit));
    let opts = OpenOptions {
        read_only,
        for_check,
        no_backing: true,
        references: ReferencePolicy::Deny,
        ..OpenOptions::default()
    };
    let img = qcow2::Qcow2::open(storage.clone(), &opts, &Chain::new(), &MemOpener::default())?;
    Ok((storage, img))
}

fn check(img: &qcow2::Qcow2, mode: RepairMode) -> Option<Result<CheckReport>> {
    check_log(img, mode).0
}

/// A check and the messages it reported (for failure reports).
fn check_log(img: &qcow2::Qcow2, mode: RepairMode) -> (Option<Result<CheckReport>>, String) {
    let mut log = String::new();
    let r = img.check().map(|c| {
        c.check(mode, &mut |m| {
            log.push_str(m);
            log.push('\n');
        })
    });
    (r, log)
}

fn clean(r: &CheckReport) -> bool {
    r.corruptions == 0 && r.check_errors == 0
}

/// Step 1: block status and reads over the whole disk, bounded.
fn walk(img: &qcow2::Qcow2) {
    let size = img.size();
    let mut off = 0;
    let mut budget: u64 = 8 << 20;
    let mut buf = Vec::new();
    for _ in 0..256 {
        if off >= size {
            break;
        }
        let Ok(e) = img.block_status(off, size - off) else { break };
        assert!(e.len > 0 && e.len <= size - off, "extent of {} bytes at {off} (disk size {size})", e.len);
        let n = e.len.min(budget).min(1 << 20);
        if n > 0 {
            buf.resize(n as usize, 0xaa);
            if img.read_at(off, &mut [IoSliceMut::new(&mut buf)]).is_ok() {
                let zero = e.kind == ExtentKind::Zero || (e.kind == ExtentKind::Unallocated && img.backing().is_none());
                if zero {
                    assert!(buf.iter().all(|&b| b == 0), "{:?} extent at {off} reads as non-zero", e.kind);
                }
            }
            budget -= n;
        }
        off += e.len;
    }
}

/// Step 3: guest writes on a repaired image read back, and leave it clean.
fn write_and_verify(bytes: Vec<u8>, writes: &[Write]) {
    let Some((storage, img)) = open(bytes, false, false) else { return };
    let size = img.size();
    let mut done: Vec<(u64, Vec<u8>)> = Vec::new();
    for w in writes {
        if size == 0 {
            break;
        }
        let off = w.offset as u64 % size;
        let len = (w.len as u64).min(size - off);
        let data = vec![w.byte; len as usize];
        if img.write_at(off, &[IoSlice::new(&data)]).is_ok() {
            done.push((off, data));
        }
    }
    for (i, (off, data)) in done.iter().enumerate() {
        let mut buf = vec![0u8; data.len()];
        if img.read_at(*off, &mut [IoSliceMut::new(&mut buf)]).is_err() {
            continue;
        }
        for (j, &got) in buf.iter().enumerate() {
            let at = off + j as u64;
            // The last write covering this byte decides what it holds.
            let want = done[i..]
                .iter()
                .rev()
                .find(|(o, d)| *o <= at && at < o + d.len() as u64)
                .map(|(o, d)| d[(at - o) as usize])
                .unwrap();
            assert_eq!(got, want, "byte {at} of write {i} reads back wrong");
        }
    }
    if img.close().is_err() {
        return;
    }
    if let Some(dir) = std::env::var_os("FUZZ_DUMP") {
        let _ = std::fs::write(std::path::Path::new(&dir).join("written.qcow2"), storage.snapshot());
    }
    let Some((_, img)) = open(storage.snapshot(), true, true) else { panic!("written image does not reopen") };
    if let (Some(Ok(r)), log) = check_log(&img, RepairMode::None) {
        // A hostile image can be clean and still alias a cluster (an L2 table that an L2 entry
        // also names as data, both counted in its refcount of 2). A write then copies the L2
        // table and drops one reference, and the remaining one lacks the COPIED flag its refcount
        // of 1 calls for: qemu does the same, and its check reports the same finding, which
        // costs an extra copy-on-write but no data. Any other finding is a bug.
        let only_copied_flags =
            log.lines().filter(|l| l.starts_with("ERROR")).all(|l| l.starts_with("ERROR OFLAG_COPIED"));
        assert!(
            clean(&r) || (r.check_errors == 0 && only_copied_flags),
            "guest writes on a clean image left it unclean: {r:?}\n{log}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((base, muts, writes)) = parse(data) else { return };
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("base {} of {}; mutations {muts:?}; writes {writes:?}", base % bases().len(), bases().len());
    }
    let bases = bases();
    let base = &bases[base % bases.len()];
    let mut bytes = base.bytes.clone();
    for m in muts {
        apply(base, m, &mut bytes);
    }

    // 1. Read-only: walk and check.
    if let Some((_, img)) = open(bytes.clone(), true, false) {
        walk(&img);
        let _ = check(&img, RepairMode::None);
    }

    // 2. Repair, then check the reopened file twice: the two checks must agree. (The repair's own
    // counts are not asserted against them: like qemu's, the recount after a rebuild keeps only
    // its leaks, so qemu-img double-checks a repaired image and reports that second check.)
    let Some((storage, img)) = open(bytes, false, true) else { return };
    let (Some(Ok(r)), repair_log) = check_log(&img, RepairMode::All) else { return };
    if img.close().is_err() {
        return;
    }
    let repaired = storage.snapshot();
    let again = match open_result(repaired.clone(), true, true) {
        Ok((_, again)) => again,
        Err(e) => panic!("repaired image does not reopen for check: {e:?}\nrepair {r:?}:\n{repair_log}"),
    };
    let (r2, log2) = check_log(&again, RepairMode::None);
    let (r3, _) = check_log(&again, RepairMode::None);
    let counts = |r: &Option<Result<CheckReport>>| {
        r.as_ref()
            .map(|r| r.as_ref().map(|r| (r.corruptions, r.leaks, r.check_errors)).map_err(|e| e.message().to_string()))
    };
    assert_eq!(
        counts(&r2),
        counts(&r3),
        "two checks of the repaired image disagree\nrepair {r:?}:\n{repair_log}check:\n{log2}"
    );
    let Some(Ok(r2)) = r2 else { return };
    if !clean(&r2) {
        return;
    }

    // 3. Writes on the repaired image.
    if let Some(dir) = std::env::var_os("FUZZ_DUMP") {
        let _ = std::fs::write(std::path::Path::new(&dir).join("repaired.qcow2"), &repaired);
    }
    write_and_verify(repaired, &writes);
});
