//! The device against hand-built chains in guest memory: each request type's effect on the image
//! and its status, and the specification's rules (direction, ranges, read-only, limits, flags,
//! chain layout) refused with the right status or a broken device.

use std::sync::Arc;

use blockdev::{BlockDriver, Chain, MemStorage};
use virtio_blk::device::{S_IOERR, S_OK, S_UNSUPP};
use virtio_blk::request::{kind, Desc};
use virtio_blk::{BlockDevice, DeviceOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const IMAGE: usize = 1 << 20;

struct Rig {
    mem: GuestMemoryMmap<()>,
    storage: Arc<MemStorage>,
    dev: BlockDevice,
}

fn rig(read_only: bool) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let bytes: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8).collect();
    let storage = Arc::new(MemStorage::new("t.raw", bytes));
    let reg = formats::Registry::new();
    let opts = blockdev::OpenOptions { read_only, ..blockdev::OpenOptions::default() };
    let image: Arc<dyn BlockDriver> =
        reg.format("raw").unwrap().open(storage.clone(), &opts, &Chain::new(), &reg).unwrap();
    let dev =
        BlockDevice::new(image, &DeviceOptions { read_only, num_queues: 2, serial: "serial-0123456789abcdef".into() });
    Rig { mem, storage, dev }
}

fn header(r: &Rig, at: u64, kind: u32, sector: u64) -> Desc {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    r.mem.write_slice(&h, GuestAddress(at)).unwrap();
    Desc { addr: at, len: 16, write: false }
}

const STATUS: u64 = 0x9000;

fn status_desc() -> Desc {
    Desc { addr: STATUS, len: 1, write: true }
}

fn status(r: &Rig) -> u8 {
    let mut b = [0u8; 1];
    r.mem.read_slice(&mut b, GuestAddress(STATUS)).unwrap();
    b[0]
}

#[test]
fn reads_and_writes_move_data_between_image_and_guest() {
    let r = rig(false);
    // IN of sectors 3..5 into two segments.
    let chain = [
        header(&r, 0x1000, kind::IN, 3),
        Desc { addr: 0x2000, len: 512, write: true },
        Desc { addr: 0x3000, len: 512, write: true },
        status_desc(),
    ];
    assert_eq!(r.dev.handle_chain(&chain, &r.mem), 1025);
    assert_eq!(status(&r), S_OK);
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
    assert!(got.iter().all(|&b| b == 4));
    // OUT of one sector at sector 10, header and data in one descriptor.
    let mut buf = vec![0u8; 16 + 512];
    buf[..4].copy_from_slice(&kind::OUT.to_le_bytes());
    buf[8..16].copy_from_slice(&10u64.to_le_bytes());
    buf[16..].fill(0xee);
    r.mem.write_slice(&buf, GuestAddress(0x4000)).unwrap();
    let chain = [Desc { addr: 0x4000, len: 528, write: false }, status_desc()];
    assert_eq!(r.dev.handle_chain(&chain, &r.mem), 1);
    assert_eq!(status(&r), S_OK);
    let snap = r.storage.snapshot();
    assert!(snap[10 * 512..11 * 512].iter().all(|&b| b == 0xee));
    assert!(snap[11 * 512..12 * 512].iter().all(|&b| b == 11), "nothing else changed");
    // FLUSH and GET_ID.
    assert_eq!(r.dev.handle_chain(&[header(&r, 0x1000, kind::FLUSH, 0), status_desc()], &r.mem), 1);
    assert_eq!(status(&r), S_OK);
    let chain = [header(&r, 0x1000, kind::GET_ID, 0), Desc { addr: 0x5000, len: 20, write: true }, status_desc()];
    assert_eq!(r.dev.handle_chain(&chain, &r.mem), 21);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(0x5000)).unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
}

#[test]
fn zeroes_and_discards_take_segments_and_check_flags() {
    let r = rig(false);
    let seg = |at: u64, sector: u64, n: u32, flags: u32| {
        let mut b = sector.to_le_bytes().to_vec();
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        r.mem.write_slice(&b, GuestAddress(at)).unwrap();
        Desc { addr: at, len: 16, write: false }
    };
    let chain = [header(&r, 0x1000, kind::WRITE_ZEROES, 0), seg(0x2000, 20, 4, 1), status_desc()];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_OK);
    assert!(r.storage.snapshot()[20 * 512..24 * 512].iter().all(|&b| b == 0));
    // Unknown flags: UNSUPP; discard takes no flags at all.
    let chain = [header(&r, 0x1000, kind::WRITE_ZEROES, 0), seg(0x2000, 20, 4, 2), status_desc()];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_UNSUPP);
    let chain = [header(&r, 0x1000, kind::DISCARD, 0), seg(0x2000, 20, 4, 1), status_desc()];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_UNSUPP);
    // Past the end, or a partial segment: IOERR, nothing done.
    let before = r.storage.snapshot();
    let chain = [header(&r, 0x1000, kind::WRITE_ZEROES, 0), seg(0x2000, 2047, 4, 0), status_desc()];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_IOERR);
    let chain = [header(&r, 0x1000, kind::DISCARD, 0), Desc { addr: 0x2000, len: 8, write: false }, status_desc()];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_IOERR);
    assert!(r.storage.snapshot() == before);
}

#[test]
fn the_specification_s_rules_are_enforced() {
    let r = rig(false);
    let before = r.storage.snapshot();
    let cases: Vec<(&str, Vec<Desc>, u8)> = vec![
        (
            "IN past the end",
            vec![header(&r, 0x1020, kind::IN, 2047), Desc { addr: 0x2000, len: 1024, write: true }, status_desc()],
            S_IOERR,
        ),
        (
            "IN of a partial sector",
            vec![header(&r, 0x1040, kind::IN, 0), Desc { addr: 0x2000, len: 100, write: true }, status_desc()],
            S_IOERR,
        ),
        (
            "IN with readable data",
            vec![header(&r, 0x1060, kind::IN, 0), Desc { addr: 0x2000, len: 512, write: false }, status_desc()],
            S_IOERR,
        ),
        (
            "OUT with writable data",
            vec![header(&r, 0x1080, kind::OUT, 0), Desc { addr: 0x2000, len: 512, write: true }, status_desc()],
            S_IOERR,
        ),
        (
            "sector overflow",
            vec![
                header(&r, 0x10a0, kind::OUT, u64::MAX / 256),
                Desc { addr: 0x2000, len: 512, write: false },
                status_desc(),
            ],
            S_IOERR,
        ),
        ("unknown type", vec![header(&r, 0x10c0, 99, 0), status_desc()], S_UNSUPP),
        ("short header", vec![Desc { addr: 0x1000, len: 8, write: false }, status_desc()], S_IOERR),
        (
            "readable after writable",
            vec![
                header(&r, 0x10e0, kind::IN, 0),
                Desc { addr: 0x2000, len: 512, write: true },
                Desc { addr: 0x3000, len: 512, write: false },
                status_desc(),
            ],
            S_IOERR,
        ),
        (
            "outside guest memory",
            vec![header(&r, 0x1100, kind::IN, 0), Desc { addr: (1 << 20) - 256, len: 512, write: true }, status_desc()],
            S_IOERR,
        ),
    ];
    for (what, chain, want) in cases {
        r.mem.write_slice(&[0xff], GuestAddress(STATUS)).unwrap();
        assert_eq!(r.dev.handle_chain(&chain, &r.mem), 1, "{what}");
        assert_eq!(status(&r), want, "{what}");
    }
    // Overlapping writable segments are refused (no aliasing views of guest memory).
    let chain = [
        header(&r, 0x1000, kind::IN, 0),
        Desc { addr: 0x2000, len: 1024, write: true },
        Desc { addr: 0x2200, len: 512, write: true },
        status_desc(),
    ];
    r.dev.handle_chain(&chain, &r.mem);
    assert_eq!(status(&r), S_IOERR);
    assert!(r.storage.snapshot() == before, "no request above reached the image");
    assert!(!r.dev.is_broken());
    // No status byte at all: length 0 and a broken device.
    assert_eq!(r.dev.handle_chain(&[header(&r, 0x1000, kind::FLUSH, 0)], &r.mem), 0);
    assert!(r.dev.is_broken());
}

#[test]
fn read_only_devices_refuse_writes_and_say_so() {
    let r = rig(true);
    assert_ne!(r.dev.features() & virtio_blk::config::F_RO, 0);
    assert_eq!(r.dev.features() & virtio_blk::config::F_DISCARD, 0);
    let before = r.storage.snapshot();
    for k in [kind::OUT, kind::WRITE_ZEROES, kind::DISCARD] {
        let chain = [header(&r, 0x1000, k, 0), Desc { addr: 0x2000, len: 512, write: false }, status_desc()];
        r.dev.handle_chain(&chain, &r.mem);
        assert_eq!(status(&r), S_IOERR, "type {k}");
    }
    assert!(r.storage.snapshot() == before);
    let cfg = r.dev.read_config(0, 8);
    assert_eq!(u64::from_le_bytes(cfg.try_into().unwrap()), (IMAGE / 512) as u64, "capacity");
    assert_eq!(r.dev.read_config(34, 2), 2u16.to_le_bytes(), "num_queues");
    assert!(r.dev.read_config(59, 2).is_empty(), "reads past the config space are empty");
}
