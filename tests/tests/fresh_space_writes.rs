//! Small writes into fresh space: qcow2 clusters and vdi blocks that a write allocates but does
//! not cover. The drivers zero the new space with the file system
//! (`Storage::zero_without_writing`, `FALLOC_FL_ZERO_RANGE`) and write only the guest's bytes, so
//! the uncovered part must read as zeros even where the host space held other bytes before
//! (garbage past the end of the image's data, where both formats put new space). Checked through vdisk and through QEMU
//! (`qemu-img check`, and `qemu-img compare` against the same writes done by `qemu-io`), with the
//! page cache and with `O_DIRECT`.

use blockdev::{BlockDriver, CacheMode, OpenOptions};
use formats::Registry;
use vdisk_tests::{qemu_img, qemu_io, s, tempdir};

const SIZE: u64 = 8 << 20;

/// (offset, length, byte) of the small writes, each into space no earlier write allocated.
const WRITES: &[(u64, u64, u8)] = &[(65536 + 8192, 4096, 0x11), (3 << 20, 512, 0x22), ((5 << 20) + 1000, 3000, 0x33)];

fn open(path: &std::path::Path, fmt: &str, cache: CacheMode) -> std::sync::Arc<dyn BlockDriver> {
    let mut opts = OpenOptions::read_write();
    opts.cache = cache;
    vdisk_tests::open_image(&Registry::new(), path, Some(fmt), &opts).unwrap()
}

/// What the guest must read: `WRITES` over zeros.
fn expected() -> Vec<u8> {
    let mut want = vec![0u8; SIZE as usize];
    for &(off, len, byte) in WRITES {
        want[off as usize..(off + len) as usize].fill(byte);
    }
    want
}

fn run(fmt: &str, cache: CacheMode) {
    let d = tempdir();
    let img = d.path().join(format!("fresh.{fmt}"));
    let reference = d.path().join(format!("reference.{fmt}"));
    for p in [&img, &reference] {
        qemu_img(&["create", "-q", "-f", fmt, s(p), &SIZE.to_string()]).ok();
    }
    // Garbage past the end of the image's file: qcow2 allocates the clusters there (their
    // refcount is zero) and vdi places its next blocks there, so the new space holds old bytes
    // that must not show through.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
        f.write_all(&vec![0xee; 4 << 20]).unwrap();
    }
    let drv = open(&img, fmt, cache);
    for &(off, len, byte) in WRITES {
        drv.write_all_at(off, &vec![byte; len as usize]).unwrap();
    }
    let mut back = vec![0u8; SIZE as usize];
    drv.read_exact_at(0, &mut back).unwrap();
    assert!(back == expected(), "{fmt} {cache:?}: vdisk reads back something else");
    drv.close().unwrap();
    drop(drv);

    for &(off, len, byte) in WRITES {
        qemu_io(&["-f", fmt, "-c", &format!("write -P {byte} {off} {len}"), s(&reference)]).ok();
    }
    let check = qemu_img(&["check", "-f", fmt, s(&img)]);
    assert_eq!(check.code, 0, "{fmt} {cache:?}: qemu-img check: {}{}", check.stdout, check.stderr);
    let cmp = qemu_img(&["compare", "-f", fmt, "-F", fmt, s(&img), s(&reference)]);
    assert_eq!(cmp.code, 0, "{fmt} {cache:?}: {}{}", cmp.stdout, cmp.stderr);
}

#[test]
fn qcow2_fresh_clusters_read_zeros_around_small_writes() {
    run("qcow2", CacheMode::Writeback);
    run("qcow2", CacheMode::None);
}

#[test]
fn vdi_fresh_blocks_read_zeros_around_small_writes() {
    run("vdi", CacheMode::Writeback);
    run("vdi", CacheMode::None);
}
