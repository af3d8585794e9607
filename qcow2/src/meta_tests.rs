//! Unit tests of the metadata (`meta.rs`) and allocation on an in-memory [`Storage`] that records
//! every write and flush: the crash order of a metadata flush, the L1/L2 and refcount changes an
//! allocation makes, frees held back until the flush that drops the last on-disk reference, and
//! the refusal to put guest data on metadata.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

use blockdev::options::CreateOptions;
use blockdev::{BlockDriver, Chain, MemStorage, OpenOptions, Prealloc, Result, Storage};

use crate::create::{build, params, DataOnly};
use crate::driver::Qcow2;
use crate::entry::{COPIED, OFFSET_MASK};

/// One request that reached the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write { offset: u64, len: u64 },
    Flush,
}

/// A [`MemStorage`] that logs its writes and flushes.
#[derive(Debug)]
struct Recorder {
    mem: MemStorage,
    log: Mutex<Vec<Op>>,
}

impl Recorder {
    fn new(bytes: Vec<u8>) -> Arc<Recorder> {
        Arc::new(Recorder { mem: MemStorage::new("rec.qcow2", bytes), log: Mutex::new(Vec::new()) })
    }

    fn take_log(&self) -> Vec<Op> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn note(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }
}

impl Storage for Recorder {
    fn len(&self) -> Result<u64> {
        self.mem.len()
    }
    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.mem.read_at(offset, bufs)
    }
    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.note(Op::Write { offset, len: blockdev::iov_len(bufs) });
        self.mem.write_at(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.note(Op::Flush);
        self.mem.flush()
    }
    fn set_len(&self, len: u64, prealloc: Prealloc) -> Result<()> {
        self.mem.set_len(len, prealloc)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.note(Op::Write { offset, len });
        self.mem.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.mem.discard(offset, len)
    }
    fn data_status(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.mem.data_status(offset, max_len)
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        self.mem.name()
    }
    fn protocol(&self) -> &'static str {
        "file"
    }
}

const CS: u64 = 64 << 10;

/// A new 64 MiB image with 64 KiB clusters (as `qemu-img create` makes it), with extra options.
fn new_image(extra: &[(&str, &str)]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new("new.qcow2", Vec::new()));
    let mut o = CreateOptions::new();
    o.set("size", "64M");
    for (k, v) in extra {
        o.set(k, v);
    }
    build(mem.clone(), None, &params(&o).unwrap()).unwrap();
    mem.snapshot()
}

fn open(file: Arc<Recorder>) -> Arc<Qcow2> {
    let opts = OpenOptions { read_only: false, no_backing: true, ..OpenOptions::default() };
    Qcow2::open(file, &opts, &Chain::new(), &DataOnly { data: None }).unwrap()
}

/// Whether `op` writes into `[start, start + len)`.
fn writes_into(op: &Op, start: u64, len: u64) -> bool {
    matches!(*op, Op::Write { offset, len: n } if offset < start + len && start < offset + n)
}

#[test]
fn a_flush_writes_refcounts_then_syncs_then_l2_then_syncs_then_l1() {
    let file = Recorder::new(new_image(&[]));
    let q = open(file.clone());
    // The first write into the empty image allocates an L2 table and a data cluster.
    q.write_at(3 * CS, &[IoSlice::new(&[0x5a; 4096])]).unwrap();
    let (l1_offset, l2_offset, rc_blocks) = {
        let m = q.lock();
        let blocks: Vec<u64> = m.rc.table.iter().copied().filter(|&b| b != 0).collect();
        (m.h.l1_table_offset, m.l1[0] & OFFSET_MASK, blocks)
    };
    assert_ne!(l2_offset, 0, "the write allocated an L2 table");
    let before_flush = file.take_log();
    assert!(
        !before_flush.iter().any(|op| writes_into(op, l1_offset, 8) || writes_into(op, l2_offset, CS)),
        "no table reached the file before the flush: {before_flush:?}"
    );
    q.flush().unwrap();
    let log = file.take_log();
    let position = |what: &dyn Fn(&Op) -> bool| log.iter().position(what);
    let last_refcount = log.iter().rposition(|op| rc_blocks.iter().any(|&b| writes_into(op, b, CS)));
    let l2 = position(&|op| writes_into(op, l2_offset, CS)).expect("the L2 table is written");
    let l1 = position(&|op| writes_into(op, l1_offset, 8)).expect("the L1 entry is written");
    let last_refcount = last_refcount.expect("the refcount block is written");
    let sync_between = |a: usize, b: usize| log[a..b].contains(&Op::Flush);
    assert!(last_refcount < l2 && sync_between(last_refcount, l2), "refcounts, sync, L2: {log:?}");
    assert!(l2 < l1 && sync_between(l2, l1), "L2, sync, L1: {log:?}");
    assert_eq!(log.last(), Some(&Op::Flush), "the flush ends durable: {log:?}");
    q.close().unwrap();
}

#[test]
fn an_allocation_counts_its_clusters_and_points_the_tables_at_them() {
    let file = Recorder::new(new_image(&[]));
    let q = open(file.clone());
    q.write_at(5 * CS + 100, &[IoSlice::new(&[1u8; 10])]).unwrap();
    let mut m = q.lock();
    let io = file.as_ref();
    let (entry, _) = m.entry(io, 5).unwrap();
    let host = entry & OFFSET_MASK;
    assert_eq!(entry & COPIED, COPIED, "a fresh cluster is this image's own");
    assert_eq!(host % CS, 0);
    assert_eq!(m.rc.get(io, host / CS).unwrap(), 1, "the data cluster is counted once");
    let l2 = m.l1[0] & OFFSET_MASK;
    assert_eq!(m.rc.get(io, l2 / CS).unwrap(), 1, "the L2 table is counted once");
    assert!(m.overlaps_metadata(host, CS).is_none(), "data is not metadata");
    assert_eq!(m.overlaps_metadata(l2, 512), Some("an L2 table"));
    assert_eq!(m.overlaps_metadata(m.h.l1_table_offset, 8), Some("the active L1 table"));
    // Neighbouring clusters are untouched.
    for gc in [4, 6] {
        assert_eq!(m.entry(io, gc).unwrap().0, 0, "cluster {gc}");
    }
}

#[test]
fn a_freed_cluster_is_reused_only_after_the_flush_that_dropped_its_reference() {
    let file = Recorder::new(new_image(&[]));
    let q = open(file.clone());
    q.write_at(0, &[IoSlice::new(&vec![7u8; CS as usize])]).unwrap();
    q.flush().unwrap();
    let old = q.lock().entry(file.as_ref(), 0).unwrap().0 & OFFSET_MASK;
    q.discard(0, CS).unwrap();
    // Not yet free: the L2 change that dropped the reference is not durable.
    q.write_at(CS, &[IoSlice::new(&vec![8u8; CS as usize])]).unwrap();
    let second = q.lock().entry(file.as_ref(), 1).unwrap().0 & OFFSET_MASK;
    assert_ne!(second, old, "a cluster still referenced on disk was reused");
    assert_eq!(q.lock().rc.get(file.as_ref(), old / CS).unwrap(), 1, "its refcount waits for the flush");
    q.flush().unwrap();
    assert_eq!(q.lock().rc.get(file.as_ref(), old / CS).unwrap(), 0, "the flush applied the free");
    q.write_at(2 * CS, &[IoSlice::new(&vec![9u8; CS as usize])]).unwrap();
    let third = q.lock().entry(file.as_ref(), 2).unwrap().0 & OFFSET_MASK;
    assert_eq!(third, old, "after the flush the first free cluster is taken again");
    let mut back = vec![0u8; 3 * CS as usize];
    q.read_at(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert!(back[..CS as usize].iter().all(|&b| b == 0), "the discarded cluster reads as zeros");
    assert!(back[CS as usize..2 * CS as usize].iter().all(|&b| b == 8));
    assert!(back[2 * CS as usize..].iter().all(|&b| b == 9));
    q.close().unwrap();
}

#[test]
fn lazy_refcounts_make_the_dirty_bit_durable_before_the_first_allocation() {
    let file = Recorder::new(new_image(&[("lazy_refcounts", "on")]));
    let q = open(file.clone());
    file.take_log();
    q.write_at(0, &[IoSlice::new(&[1u8; 512])]).unwrap();
    let log = file.take_log();
    let header = log.iter().position(|op| writes_into(op, 0, 512)).expect("the header is written");
    let data = q.lock().entry(file.as_ref(), 0).unwrap().0 & OFFSET_MASK;
    let data_write = log.iter().position(|op| writes_into(op, data, CS)).expect("the data is written");
    assert!(header < data_write && log[header..data_write].contains(&Op::Flush), "dirty bit, sync, data: {log:?}");
    assert!(q.lock().dirty_on_disk);
    q.close().unwrap();
    assert!(!q.lock().dirty_on_disk, "a clean close clears the dirty bit");
}
