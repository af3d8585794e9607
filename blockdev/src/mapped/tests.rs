//! The core against a toy format: units of 4 KiB appended to a [`MemStorage`], a table in memory,
//! an optional backing image, and an optional sector granularity. Every operation is checked
//! against a model of the guest bytes.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::driver::{Extent, ExtentKind, ResizeOptions};
use crate::info::ImageInfo;
use crate::range_lock::{RangeGuard, RangeLock};
use crate::MemStorage;

const UNIT: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    Unallocated,
    Zero,
    At(u64),
}

#[derive(Debug)]
struct Toy {
    storage: Arc<MemStorage>,
    size: u64,
    table: Mutex<Vec<Entry>>,
    end: Mutex<u64>,
    locks: RangeLock,
    backing: Option<Arc<dyn BlockDriver>>,
    granularity: Option<Granularity>,
    commits: Mutex<u64>,
    /// Every write moves its unit to fresh space, filled with what the unit reads now (as qcow2
    /// moves shared and compressed clusters), and zero units keep a reserved host offset.
    moves: bool,
}

enum ToyPending<'a> {
    Held(#[allow(dead_code)] RangeGuard<'a>),
    Fresh(#[allow(dead_code)] RangeGuard<'a>, u64, u64),
}

impl Toy {
    fn new(size: u64, backing: Option<Arc<dyn BlockDriver>>, sector: Option<u64>) -> Toy {
        Toy {
            storage: Arc::new(MemStorage::new("toy", Vec::new()).with_limit(64 << 20)),
            size,
            table: Mutex::new(vec![Entry::Unallocated; size.div_ceil(UNIT) as usize]),
            end: Mutex::new(0),
            locks: RangeLock::new(),
            backing,
            granularity: sector.map(Granularity::new),
            commits: Mutex::new(0),
            moves: false,
        }
    }

    fn entry(&self, unit: u64) -> Entry {
        self.table.lock().unwrap()[unit as usize]
    }

    fn dyn_storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }
}

impl MappedImage for Toy {
    type Pending<'a> = ToyPending<'a>;

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapped> {
        let unit = offset / UNIT;
        let len = (UNIT - offset % UNIT).min(max_len);
        Ok(Mapped::new(
            len,
            match self.entry(unit) {
                Entry::Unallocated => Mapping::Unallocated,
                Entry::Zero if self.moves => {
                    Mapping::Reserved { storage: self.dyn_storage(), offset: offset % UNIT, reads: Unwritten::Zeros }
                }
                Entry::Zero => Mapping::Zero,
                Entry::At(host) => {
                    Mapping::Data { storage: self.dyn_storage(), offset: host + offset % UNIT, holes: Holes::Ignored }
                }
            },
        ))
    }

    fn prepare_write(&self, offset: u64, len: u64) -> Result<WritePlan<ToyPending<'_>>> {
        let unit = offset / UNIT;
        let n = (UNIT - offset % UNIT).min(len);
        let guard = self.locks.lock(unit, unit + 1);
        let (host, fill, pending) = match self.entry(unit) {
            Entry::At(host) if !self.moves => (host + offset % UNIT, None, ToyPending::Held(guard)),
            found => {
                let at = {
                    let mut end = self.end.lock().unwrap();
                    *end += UNIT;
                    *end - UNIT
                };
                let source = match found {
                    _ if self.moves => FillSource::Current,
                    Entry::Zero => FillSource::Zeros,
                    _ => FillSource::Backing,
                };
                let fill = Fill { fresh_space: self.moves, ..Fill::new(unit * UNIT, at, UNIT, source) };
                (at + offset % UNIT, Some(fill), ToyPending::Fresh(guard, unit, at))
            }
        };
        Ok(WritePlan { len: n, storage: self.dyn_storage(), host, fill, pending })
    }

    fn commit_write(&self, pending: ToyPending<'_>, _written: DataWritten) -> Result<()> {
        if let ToyPending::Fresh(_guard, unit, at) = pending {
            self.table.lock().unwrap()[unit as usize] = Entry::At(at);
            *self.commits.lock().unwrap() += 1;
        }
        Ok(())
    }

    fn granularity(&self) -> Option<&Granularity> {
        self.granularity.as_ref()
    }

    /// Whole units become zero units; the rest is left to the core.
    fn zero_range(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<Zeroing> {
        if offset % UNIT == 0 && len >= UNIT {
            self.table.lock().unwrap()[(offset / UNIT) as usize] = Entry::Zero;
            return Ok(Zeroing::Done(UNIT));
        }
        Ok(Zeroing::Fallback((UNIT - offset % UNIT).min(len)))
    }
}

impl BlockDriver for Toy {
    fn format(&self) -> &'static str {
        "toy"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn filename(&self) -> &str {
        "toy"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        read(self, offset, bufs)
    }
    fn write_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        write(self, offset, bufs)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        write_zeroes(self, offset, len, flags)
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        block_status(self, offset, max_len)
    }
    fn resize(&self, _new_size: u64, _opts: &ResizeOptions) -> Result<()> {
        Err(Error::unsupported("toy"))
    }
    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo::default())
    }
    fn backing(&self) -> Option<Arc<dyn BlockDriver>> {
        self.backing.clone()
    }
    fn storage(&self) -> Option<Arc<dyn Storage>> {
        Some(self.dyn_storage())
    }
}

/// A backing image of `size` bytes with a recognisable pattern.
fn patterned_backing(size: u64) -> (Arc<dyn BlockDriver>, Vec<u8>) {
    let base = Toy::new(size, None, None);
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
    base.write_at(0, &[IoSlice::new(&bytes)]).unwrap();
    (Arc::new(base), bytes)
}

/// Where two byte strings first differ (or their common length when one is a prefix).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

fn assert_same(got: &[u8], want: &[u8]) {
    assert!(got == want, "first difference at byte {:?}", first_difference(got, want));
}

fn read_all(d: &dyn BlockDriver) -> Vec<u8> {
    let mut out = vec![0u8; d.size() as usize];
    d.read_at(0, &mut [IoSliceMut::new(&mut out)]).unwrap();
    out
}

#[test]
fn a_partial_write_copies_the_rest_of_its_unit_from_the_backing_image() {
    let (backing, mut model) = patterned_backing(3 * UNIT);
    // The overlay is larger than its backing image: past the backing image's end reads zeros.
    let top = Toy::new(4 * UNIT, Some(backing), None);
    model.resize(4 * UNIT as usize, 0);
    top.write_at(UNIT + 100, &[IoSlice::new(&[9u8; 50])]).unwrap();
    model[UNIT as usize + 100..UNIT as usize + 150].fill(9);
    top.write_at(3 * UNIT + 1, &[IoSlice::new(&[7u8; 2])]).unwrap();
    model[3 * UNIT as usize + 1..3 * UNIT as usize + 3].fill(7);
    assert_same(&read_all(&top), &model);
    // The fresh unit holds the backing bytes around the write, in the container itself.
    let Entry::At(host) = top.entry(1) else { panic!("unit 1 not allocated") };
    let stored = top.storage.snapshot();
    assert_same(&stored[host as usize..(host + UNIT) as usize], &model[UNIT as usize..2 * UNIT as usize]);
    assert_eq!(*top.commits.lock().unwrap(), 2);
}

#[test]
fn scatter_gather_lists_are_read_and_written_in_place_across_units() {
    let top = Toy::new(4 * UNIT, None, None);
    let data: Vec<u8> = (0..3 * UNIT).map(|i| (i % 13) as u8).collect();
    let parts: Vec<IoSlice<'_>> = data.chunks(1000).map(IoSlice::new).collect();
    top.write_at(500, &parts).unwrap();
    let mut back = vec![0u8; data.len()];
    let mut bufs: Vec<IoSliceMut<'_>> = back.chunks_mut(777).map(IoSliceMut::new).collect();
    top.read_at(500, &mut bufs).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_failed_data_write_publishes_nothing() {
    let (backing, model) = patterned_backing(2 * UNIT);
    let mut top = Toy::new(2 * UNIT, Some(backing), None);
    top.storage = Arc::new(MemStorage::new("toy", Vec::new()).with_limit(UNIT));
    top.write_at(0, &[IoSlice::new(&[1u8; 10])]).unwrap();
    let err = top.write_at(UNIT, &[IoSlice::new(&[2u8; 10])]).unwrap_err();
    assert!(err.to_string().contains("File too large"), "{err}");
    assert_eq!(top.entry(1), Entry::Unallocated);
    assert_same(&read_all(&top)[UNIT as usize..], &model[UNIT as usize..]);
}

#[test]
fn zeroing_leaves_zero_runs_alone_and_refuses_to_write_under_no_fallback() {
    let top = Toy::new(4 * UNIT, None, None);
    top.write_at(0, &[IoSlice::new(&[5u8; 2 * UNIT as usize])]).unwrap();
    let no_fallback = ZeroFlags { may_unmap: false, no_fallback: true };
    // Unit 3 is unallocated without a backing image: already zeros, nothing to write.
    top.write_zeroes(3 * UNIT + 10, 20, no_fallback).unwrap();
    assert_eq!(top.entry(3), Entry::Unallocated);
    // Part of unit 0 holds data: zeroing it needs a write, which no_fallback refuses.
    let err = top.write_zeroes(10, 20, no_fallback).unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
    top.write_zeroes(10, UNIT + 20, ZeroFlags::default()).unwrap();
    let mut model = vec![0u8; 4 * UNIT as usize];
    model[..2 * UNIT as usize].fill(5);
    model[10..UNIT as usize].fill(0);
    model[UNIT as usize..UNIT as usize + 30].fill(0);
    assert_same(&read_all(&top), &model);
    assert_eq!(top.block_status(UNIT, 4 * UNIT).unwrap().kind, ExtentKind::Data);
}

#[test]
fn block_status_follows_the_mapping_reads_use() {
    let top = Toy::new(4 * UNIT, None, None);
    top.write_at(UNIT, &[IoSlice::new(&[1u8; 10])]).unwrap();
    top.write_zeroes(2 * UNIT, UNIT, ZeroFlags::default()).unwrap();
    let kinds: Vec<(u64, ExtentKind)> =
        (0..4).map(|u| top.block_status(u * UNIT, UNIT).map(|e| (e.len, e.kind)).unwrap()).collect();
    use ExtentKind::*;
    assert_eq!(kinds, vec![(UNIT, Unallocated), (UNIT, Data), (UNIT, Zero), (UNIT, Unallocated)]);
    assert!(top.block_status(4 * UNIT, 1).is_err());
    assert_eq!(top.block_status(0, 10).unwrap().len, 10);
}

#[test]
fn a_moved_unit_carries_its_old_bytes_and_reserved_runs_report_their_host() {
    let (backing, mut model) = patterned_backing(2 * UNIT);
    let mut top = Toy::new(2 * UNIT, Some(backing), None);
    top.moves = true;
    top.write_at(100, &[IoSlice::new(&[1u8; 10])]).unwrap();
    let Entry::At(first) = top.entry(0) else { panic!("unit 0 not allocated") };
    top.write_at(2000, &[IoSlice::new(&[2u8; 10])]).unwrap();
    let Entry::At(second) = top.entry(0) else { panic!("unit 0 not allocated") };
    assert_ne!(first, second, "the unit moved");
    model[100..110].fill(1);
    model[2000..2010].fill(2);
    assert_same(&read_all(&top), &model);
    top.write_zeroes(UNIT, UNIT, ZeroFlags::default()).unwrap();
    let status = top.block_status(UNIT + 8, UNIT).unwrap();
    assert_eq!((status.kind, status.host.map(|(_, at)| at)), (ExtentKind::Zero, Some(8)));
    model[UNIT as usize..].fill(0);
    assert_same(&read_all(&top), &model);
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: u64, seed: u8, pieces: u64 },
    Zero { at: u64, len: u64 },
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |at| (Just(at), 1..=(size - at).min(3 * UNIT)));
    prop_oneof![
        (range.clone(), any::<u8>(), 1..5u64).prop_map(|((at, len), seed, pieces)| Op::Write { at, len, seed, pieces }),
        range.prop_map(|(at, len)| Op::Zero { at, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any mix of writes (scatter-gather, unaligned) and zeroing over a backing image, with and
    /// without sector granularity, with units written in place or moved on every write (the fill
    /// then read from the image itself), reads back as the model says.
    #[test]
    fn the_core_keeps_the_model(
        ops in proptest::collection::vec(op(5 * UNIT), 1..25),
        sector in prop_oneof![Just(None), Just(Some(512u64))],
        moves in any::<bool>(),
    ) {
        let (backing, mut model) = patterned_backing(4 * UNIT);
        model.resize(5 * UNIT as usize, 0);
        let mut top = Toy::new(5 * UNIT, Some(backing), sector);
        top.moves = moves;
        for op in ops {
            match op {
                Op::Write { at, len, seed, pieces } => {
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                    let step = (len as usize).div_ceil(pieces as usize).max(1);
                    let parts: Vec<IoSlice<'_>> = data.chunks(step).map(IoSlice::new).collect();
                    top.write_at(at, &parts).unwrap();
                    model[at as usize..(at + len) as usize].copy_from_slice(&data);
                }
                Op::Zero { at, len } => {
                    top.write_zeroes(at, len, ZeroFlags::default()).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
            }
            let got = read_all(&top);
            prop_assert!(got == model, "first difference at byte {:?}", first_difference(&got, &model));
        }
    }
}
