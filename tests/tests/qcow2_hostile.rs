//! Malformed qcow2 images: each must be refused with a clear error (or read safely), never panic,
//! never allocate memory in proportion to a lying header field, never write over metadata.

use std::path::{Path, PathBuf};

use blockdev::{ErrorKind, OpenOptions, RepairMode};
use formats::Registry;
use vdisk_tests::{open_image, qemu_img, qemu_io, s, tempdir};

/// A valid 64 MiB image with some data, as qemu-img makes it.
fn base(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-f", "qcow2", s(&p), "64M"]).ok();
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x5a 0 128k", s(&p)]).ok();
    p
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn open_err(p: &Path) -> blockdev::Error {
    match open_image(&Registry::new(), p, Some("qcow2"), &OpenOptions::default()) {
        Ok(_) => panic!("{} opened although it is malformed", p.display()),
        Err(e) => e,
    }
}

#[test]
fn header_fields_are_validated_before_use() {
    let d = tempdir();
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        ("cluster-bits-low", 20, 8u32.to_be_bytes().to_vec(), "Unsupported cluster size: 2^8"),
        ("cluster-bits-high", 20, 31u32.to_be_bytes().to_vec(), "Unsupported cluster size: 2^31"),
        ("version", 4, 9u32.to_be_bytes().to_vec(), "Unsupported qcow2 version 9"),
        ("l1-huge", 36, u32::MAX.to_be_bytes().to_vec(), "Active L1 table too large"),
        ("l1-unaligned", 40, 0x30001u64.to_be_bytes().to_vec(), "Active L1 table offset invalid"),
        ("l1-too-small", 36, 0u32.to_be_bytes().to_vec(), "L1 table is too small"),
        ("reftable-huge", 56, u32::MAX.to_be_bytes().to_vec(), "Reference count table too large"),
        ("reftable-unaligned", 48, 0x10008u64.to_be_bytes().to_vec(), "Reference count table offset invalid"),
        ("no-reftable", 56, 0u32.to_be_bytes().to_vec(), "Image does not contain a reference count table"),
        ("snapshots-huge", 60, u32::MAX.to_be_bytes().to_vec(), "Snapshot table too large"),
        ("refcount-order", 96, 7u32.to_be_bytes().to_vec(), "Reference count entry width too large"),
        ("header-length", 100, 0x20000u32.to_be_bytes().to_vec(), "qcow2 header exceeds cluster size"),
        ("unknown-incompat", 72, (1u64 << 40).to_be_bytes().to_vec(), "Unknown incompatible feature: 10000000000"),
        ("crypt", 32, 5u32.to_be_bytes().to_vec(), "Unsupported encryption method: 5"),
        ("backing-offset", 8, 0x20000u64.to_be_bytes().to_vec(), "Invalid backing file offset"),
        ("size-huge", 24, (u64::MAX / 2).to_be_bytes().to_vec(), "Image is too big"),
    ];
    for (name, at, bytes, want) in cases {
        let p = base(d.path(), name);
        patch(&p, at, &bytes);
        let e = open_err(&p);
        assert!(e.message().contains(want), "{name}: got {:?}, want {want:?}", e.message());
    }
}

#[test]
fn tables_pointing_into_metadata_or_past_the_end_are_contained() {
    let d = tempdir();
    let reg = Registry::new();
    // L1 entry 0 points at the refcount table: reading must not crash, writing must be refused
    // and the image marked corrupt instead of overwriting the refcount table.
    let p = base(d.path(), "l2-on-reftable");
    patch(&p, 0x30000, &(0x8000_0000_0001_0000u64).to_be_bytes());
    let drv = open_image(&reg, &p, Some("qcow2"), &OpenOptions::read_write()).unwrap();
    let mut buf = vec![0u8; 4096];
    let _ = drv.read_exact_at(0, &mut buf); // whatever the header bytes decode to; no panic
    let before = std::fs::read(&p).unwrap()[0x10000..0x20000].to_vec();
    let e = drv.write_all_at(0, &[1u8; 512]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    drop(drv);
    let after = std::fs::read(&p).unwrap();
    assert!(after[0x10000..0x20000] == before[..], "the refcount table survives");
    assert!(u64::from_be_bytes(after[72..80].try_into().unwrap()) & 2 != 0, "the corrupt bit is set");
    let e = open_image(&reg, &p, Some("qcow2"), &OpenOptions::read_write()).unwrap_err();
    assert_eq!(e.message(), "qcow2: Image is corrupt; cannot be opened read/write");
    // Read-only opens of the corrupt image still work.
    assert!(open_image(&reg, &p, Some("qcow2"), &OpenOptions::default()).is_ok());

    // An L2 table past the end of the file reads as unallocated (zeros) and a data cluster past the
    // end reads as zeros; nothing is allocated for them.
    let p = base(d.path(), "past-end");
    patch(&p, 0x30000, &(0x8000_0000_4000_0000u64).to_be_bytes());
    let drv = open_image(&reg, &p, Some("qcow2"), &OpenOptions::default()).unwrap();
    let mut buf = vec![1u8; 65536];
    drv.read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // Unaligned L2 table offset: a clear corruption error.
    let p = base(d.path(), "l2-unaligned");
    patch(&p, 0x30000, &(0x8000_0000_0004_0200u64).to_be_bytes());
    let drv = open_image(&reg, &p, Some("qcow2"), &OpenOptions::default()).unwrap();
    let e = drv.read_exact_at(0, &mut buf).unwrap_err();
    assert!(e.message().contains("L2 table offset 0x40200 unaligned"), "{}", e.message());
}

#[test]
fn compressed_entries_with_absurd_sizes_are_bounded() {
    let d = tempdir();
    let src = d.path().join("s.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let p = d.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&p)]).ok();
    // Find the first L2 table and make entry 0 claim the maximum sector count.
    let img = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(img[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(img[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = u64::from_be_bytes(img[l2..l2 + 8].try_into().unwrap());
    patch(&p, l2 as u64, &(e | (0xff << 54)).to_be_bytes());
    let drv = open_image(&Registry::new(), &p, Some("qcow2"), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    // Either the data still decompresses (trailing bytes ignored) or a clear error: never a panic.
    match drv.read_exact_at(0, &mut buf) {
        Ok(()) => assert!(buf.iter().all(|&b| b == 7)),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt),
    }
}

#[test]
fn repair_does_not_write_refcounts_over_metadata_past_the_end() {
    // 512-byte clusters: header, refcount table, refcount block and L1 table in clusters 0 to 3.
    // Cut after the refcount table, the refcount block and the L1 table lie past the end of the
    // file: counting skips them, so their clusters look free to the rebuild of the refcount
    // structure, which must not write the new one over them (found by fuzz/qcow2_tables: the
    // repair claimed success and the next check read the new refcount block as the L1 table).
    let d = tempdir();
    let p = d.path().join("cut.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", s(&p), "1M"]).ok();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(1024).unwrap();
    let reg = Registry::new();
    let rw = OpenOptions { read_only: false, for_check: true, ..OpenOptions::default() };
    let drv = open_image(&reg, &p, Some("qcow2"), &rw).unwrap();
    let repaired = drv.check().unwrap().check(RepairMode::All, &mut |_| {});
    drop(drv);
    // qemu-img refuses this repair too ("ERROR writing refblock": the overlap check).
    let e = repaired.expect_err("the rebuild must refuse to overwrite metadata");
    assert!(e.message().contains("Preventing invalid write on metadata"), "{}", e.message());
    // Nothing was switched to a half-written structure: the image checks as before.
    let ro = OpenOptions { for_check: true, ..OpenOptions::default() };
    let drv = open_image(&reg, &p, Some("qcow2"), &ro).unwrap();
    let again = drv.check().unwrap().check(RepairMode::None, &mut |_| {}).unwrap();
    assert!(again.corruptions > 0, "{again:?}");
}

#[test]
fn check_refuses_an_absurd_snapshot_count() {
    // An open for check does not validate the snapshot table; the check itself must refuse a count
    // of 2^32 - 1 as qemu's does ("snapshot table too large", exit 1) instead of walking it
    // (found by fuzz/qcow2_tables as a timeout).
    let d = tempdir();
    let p = base(d.path(), "snapshots");
    patch(&p, 60, &u32::MAX.to_be_bytes());
    let ro = OpenOptions { for_check: true, ..OpenOptions::default() };
    let drv = open_image(&Registry::new(), &p, Some("qcow2"), &ro).unwrap();
    let mut log = Vec::new();
    let started = std::time::Instant::now();
    let e = drv.check().unwrap().check(RepairMode::None, &mut |m| log.push(m.to_string())).unwrap_err();
    assert!(started.elapsed().as_secs() < 10);
    assert!(e.message().contains("File too large"), "{e}");
    // (Printed as an error report: `qemu-img: ERROR snapshot table too large`.)
    assert_eq!(log[0], blockdev::info::error_report_line("ERROR snapshot table too large"));
}

#[test]
fn repair_does_not_write_an_l1_table_over_the_header() {
    // The L1 table offset says 0: the "L1 entries" are the header's bytes. Fixing their COPIED
    // flags must not write them back over the header (found by fuzz/qcow2_tables: the repaired
    // file no longer opened, its refcount table offset overwritten).
    let d = tempdir();
    let p = base(d.path(), "l1-on-header");
    patch(&p, 40, &0u64.to_be_bytes());
    // Eight entries: entry 6 is the refcount table offset, a cluster with refcount 1 and no COPIED.
    patch(&p, 36, &8u32.to_be_bytes());
    let before = std::fs::read(&p).unwrap()[..512].to_vec();
    let rw = OpenOptions { read_only: false, for_check: true, ..OpenOptions::default() };
    let drv = open_image(&Registry::new(), &p, Some("qcow2"), &rw).unwrap();
    let _ = drv.check().unwrap().check(RepairMode::All, &mut |_| {});
    drop(drv);
    let after = std::fs::read(&p).unwrap();
    // No COPIED flag landed in the header's fields (the refcount table offset may have moved, by
    // a rebuild that updated the header properly), and the image still opens for check.
    assert_eq!(after[..48], before[..48]);
    assert_eq!(after[48] & 0x80, 0, "a COPIED flag was written into the refcount table offset");
    let ro = OpenOptions { for_check: true, ..OpenOptions::default() };
    open_image(&Registry::new(), &p, Some("qcow2"), &ro).expect("the repaired image opens for check");
}

/// qemu keeps the backing file name as a C string: an empty name (offset set, size 0) means no
/// backing file, and a NUL ends the name. Found by the `qcow2_tables` fuzz target: vdisk tried
/// to open a backing file called ''.
#[test]
fn backing_names_end_at_nul_and_empty_means_none() {
    let d = tempdir();
    for (name, bytes, want) in [("empty", &b""[..], None), ("nul", &b"ab\0cd"[..], Some("ab"))] {
        let p = base(d.path(), &format!("{name}.qcow2"));
        // qemu-img wrote no backing name; place one at byte 0x400 of the first cluster.
        patch(&p, 0x400, bytes);
        patch(&p, 8, &0x400u64.to_be_bytes());
        patch(&p, 16, &(bytes.len() as u32).to_be_bytes());
        let q = qemu_img(&["info", "--output=json", s(&p)]);
        let v: serde_json::Value = serde_json::from_str(&q.ok().stdout).unwrap();
        assert_eq!(v["backing-filename"].as_str(), want, "{name}: qemu-img's reading");
        let mut opts = OpenOptions { no_backing: true, ..OpenOptions::default() };
        opts.read_only = true;
        let drv = open_image(&Registry::new(), &p, Some("qcow2"), &opts).unwrap();
        assert_eq!(drv.info().unwrap().backing_filename.as_deref(), want, "{name}: vdisk's reading");
    }
}
