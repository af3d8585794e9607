use super::*;
use crate::storage::{read_exact_at, write_all_at};

fn tmp_file(dir: &tempfile::TempDir, name: &str, len: u64) -> String {
    let p = dir.path().join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    p.to_str().unwrap().to_string()
}

fn open(path: &str, cache: CacheMode, read_only: bool) -> HostFile {
    HostFile::open(path, &HostOpenOptions { read_only, cache, ..Default::default() }).unwrap()
}

#[test]
fn vectored_io_round_trips_and_reads_zeros_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "a", 0);
    let f = open(&p, CacheMode::Writeback, false);
    let a = [1u8; 3];
    let b = [2u8; 5];
    f.write_at(10, &[IoSlice::new(&a), IoSlice::new(&b)]).unwrap();
    assert_eq!(f.len().unwrap(), 18);
    let mut x = [9u8; 4];
    let mut y = [9u8; 8];
    f.read_at(9, &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)]).unwrap();
    assert_eq!(x, [0, 1, 1, 1]);
    assert_eq!(y, [2, 2, 2, 2, 2, 0, 0, 0], "bytes past EOF read as zeros");
}

#[test]
fn direct_io_bounces_unaligned_requests_and_keeps_length() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "d", 0);
    let f = match HostFile::open(&p, &HostOpenOptions { cache: CacheMode::None, ..Default::default() }) {
        Ok(f) => f,
        Err(e) if e.errno() == Some(libc::EINVAL) => return, // tmpfs has no O_DIRECT
        Err(e) => panic!("{e}"),
    };
    write_all_at(&f, 0, &vec![0x11; 8192]).unwrap();
    write_all_at(&f, 100, &[0x22; 10]).unwrap();
    write_all_at(&f, 8192, &[0x33; 7]).unwrap();
    assert_eq!(f.len().unwrap(), 8199, "an unaligned extending write leaves the true length");
    let mut b = vec![0u8; 120];
    read_exact_at(&f, 0, &mut b).unwrap();
    assert_eq!(&b[..100], &[0x11; 100][..]);
    assert_eq!(&b[100..110], &[0x22; 10]);
    assert_eq!(&b[110..], &[0x11; 10]);
    let mut t = [0u8; 9];
    read_exact_at(&f, 8191, &mut t).unwrap();
    assert_eq!(t, [0x11, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33, 0]);
}

#[test]
fn empty_slices_do_not_make_aligned_direct_requests_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "e", 0);
    let f = match HostFile::open(&p, &HostOpenOptions { cache: CacheMode::None, ..Default::default() }) {
        Ok(f) => f,
        Err(e) if e.errno() == Some(libc::EINVAL) => return, // tmpfs has no O_DIRECT
        Err(e) => panic!("{e}"),
    };
    let data = crate::buffer::AlignedBuf::new(8192, 4096);
    let empty: &[u8] = &[];
    let bufs = [IoSlice::new(empty), IoSlice::new(&data), IoSlice::new(empty)];
    assert!(!f.needs_bounce(0, bufs.iter().map(|b| (b.len(), b.as_ptr() as usize))));
    let odd = [IoSlice::new(&data[1..])];
    assert!(f.needs_bounce(0, odd.iter().map(|b| (b.len(), b.as_ptr() as usize))));
    f.write_at(0, &bufs).unwrap();
    assert_eq!(f.len().unwrap(), 8192);
}

#[test]
fn concurrent_unaligned_direct_writes_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "c", 65536);
    let f = match HostFile::open(&p, &HostOpenOptions { cache: CacheMode::None, ..Default::default() }) {
        Ok(f) => f,
        Err(_) => return,
    };
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let f = &f;
            s.spawn(move || {
                for i in 0..64u64 {
                    // Neighbouring 100-byte records that share 4 KiB blocks across threads.
                    let rec = i * 8 + t as u64;
                    write_all_at(f, rec * 100, &[t + 1; 100]).unwrap();
                }
            });
        }
    });
    let mut all = vec![0u8; 512 * 100];
    read_exact_at(&f, 0, &mut all).unwrap();
    for rec in 0..512u64 {
        let want = (rec % 8) as u8 + 1;
        assert!(all[rec as usize * 100..(rec as usize + 1) * 100].iter().all(|&b| b == want), "record {rec}");
    }
}

#[test]
fn holes_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "h", 1 << 20);
    let f = open(&p, CacheMode::Writeback, false);
    write_all_at(&f, 65536, &[5u8; 65536]).unwrap();
    let (data, len) = f.data_status(0, 1 << 20).unwrap();
    assert!(!data);
    assert_eq!(len, 65536);
    let (data, len) = f.data_status(65536, 1 << 20).unwrap();
    assert!(data);
    assert_eq!(len, 65536);
    f.write_zeroes(65536 + 4096, 4096, true).unwrap();
    f.write_zeroes(65536 + 8192, 4096, false).unwrap();
    f.discard(65536 + 12288, 4096).unwrap();
    let mut b = vec![1u8; 16384];
    read_exact_at(&f, 65536, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 5));
    assert!(b[4096..].iter().all(|&x| x == 0));
    // Zeroing past the end grows the file.
    f.write_zeroes((1 << 20) - 10, 20, true).unwrap();
    assert_eq!(f.len().unwrap(), (1 << 20) + 10);
}

#[test]
fn set_len_with_preallocation() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "p", 0);
    let f = open(&p, CacheMode::Writeback, false);
    f.set_len(1 << 20, Prealloc::Full).unwrap();
    assert_eq!(f.len().unwrap(), 1 << 20);
    assert!(f.allocated_size().unwrap().unwrap() >= 1 << 20);
    f.set_len(2 << 20, Prealloc::Falloc).unwrap();
    assert!(f.allocated_size().unwrap().unwrap() >= 2 << 20);
    f.set_len(4096, Prealloc::Off).unwrap();
    assert_eq!(f.len().unwrap(), 4096);
}

#[test]
fn read_only_refuses_writes_and_errors_have_qemu_text() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "r", 512);
    let f = open(&p, CacheMode::Writeback, true);
    assert_eq!(write_all_at(&f, 0, &[1]).unwrap_err().kind(), ErrorKind::ReadOnly);
    let missing = dir.path().join("missing");
    let e = HostFile::open(missing.to_str().unwrap(), &HostOpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.message(), format!("Could not open '{}': No such file or directory", missing.display()));
    let d = dir.path().to_str().unwrap();
    let e = HostFile::open(d, &HostOpenOptions { read_only: true, ..Default::default() }).unwrap_err();
    assert_eq!(e.message(), format!("'file' driver requires '{d}' to be a regular file"));
}

#[test]
fn character_devices_open_as_host_devices_of_their_seek_length() {
    for dev in ["/dev/null", "/dev/zero"] {
        let f = open(dev, CacheMode::Writeback, true);
        assert_eq!(f.len().unwrap(), 0, "{dev}");
        assert_eq!(f.protocol(), "host_device");
        assert!(!f.has_zero_init(), "{dev}: a device is not known to read as zeros");
        let w = open(dev, CacheMode::Writeback, false);
        assert!(w.set_len(1 << 20, Prealloc::Off).is_err(), "{dev}: devices do not grow");
        assert!(!w.zero_without_writing(0, 4096), "{dev}");
    }
}

#[test]
fn locks_conflict_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "l", 512);
    let writer = open(&p, CacheMode::Writeback, false);
    writer
        .set_permissions(
            Perms::CONSISTENT_READ.union(Perms::WRITE).union(Perms::RESIZE),
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED),
        )
        .unwrap();
    // A second open that wants to write conflicts with the unshared write.
    let other = open(&p, CacheMode::Writeback, false);
    let e = other.set_permissions(Perms::CONSISTENT_READ.union(Perms::WRITE), Perms::ALL).unwrap_err();
    // Both opens are this process's: the kind says so; the message is qemu's either way.
    assert_eq!(e.kind(), ErrorKind::LockedInProcess);
    assert_eq!(e.message(), format!("Failed to get \"write\" lock\nIs another process using the image [{p}]?"));
    assert!(format!("{e:#}").contains("held by another open of the image in this process"), "{e:#}");
    // A reader that refuses to share writes conflicts with the writer's write permission.
    let reader = open(&p, CacheMode::Writeback, true);
    let e = reader.set_permissions(Perms::CONSISTENT_READ, Perms::ALL.minus(Perms::WRITE)).unwrap_err();
    assert!(e.message().starts_with("Failed to get shared \"write\" lock"));
    assert_eq!(e.kind(), ErrorKind::LockedInProcess);
    // Force-share style: read without refusing anything works.
    reader.set_permissions(Perms::CONSISTENT_READ, Perms::ALL).unwrap();
    drop(writer);
    other.set_permissions(Perms::CONSISTENT_READ.union(Perms::WRITE), Perms::ALL).unwrap();
}

#[test]
fn reserve_grows_the_file_with_zeros_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "r", 0);
    let f = open(&p, CacheMode::Writeback, false);
    write_all_at(&f, 0, &[0x5a; 4096]).unwrap();
    // Over existing data and past the end: the data stays, the new range reads as zeros and is
    // allocated (the point of reserving).
    f.reserve(0, 1 << 20);
    assert_eq!(f.len().unwrap(), 1 << 20);
    let mut back = vec![0u8; 1 << 20];
    read_exact_at(&f, 0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0x5a));
    assert!(back[4096..].iter().all(|&b| b == 0));
    let allocated = f.allocated_size().unwrap().unwrap();
    assert!(allocated >= 1 << 20, "reserved range allocated: {allocated}");
    // A read-only file is left alone.
    drop(f);
    let ro = open(&p, CacheMode::Writeback, true);
    ro.reserve(1 << 20, 1 << 20);
    assert_eq!(ro.len().unwrap(), 1 << 20);
}

#[test]
fn zero_without_writing_zeroes_old_data_and_grows_the_file() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let dir = tempfile::tempdir().unwrap();
        let p = tmp_file(&dir, "z", 0);
        let f = open(&p, cache, false);
        write_all_at(&f, 0, &vec![0x5a; 64 << 10]).unwrap();
        // Over old data and past the end: all of it reads as zeros, the data before stays.
        assert!(
            f.zero_without_writing(16 << 10, 1 << 20),
            "{cache:?}: the test directory's file system (ext4, xfs) zeroes ranges"
        );
        assert_eq!(f.len().unwrap(), (16 << 10) + (1 << 20));
        let mut back = vec![0xffu8; (16 << 10) + (1 << 20)];
        read_exact_at(&f, 0, &mut back).unwrap();
        assert!(back[..16 << 10].iter().all(|&b| b == 0x5a), "{cache:?}");
        assert!(back[16 << 10..].iter().all(|&b| b == 0), "{cache:?}");
        drop(f);
        // A read-only file is left alone.
        let ro = open(&p, cache, true);
        assert!(!ro.zero_without_writing(0, 4096));
        let mut first = [0u8; 4];
        read_exact_at(&ro, 0, &mut first).unwrap();
        assert_eq!(first, [0x5a; 4]);
    }
}

#[test]
fn eager_writeback_writes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp_file(&dir, "e", 0);
    let opts = HostOpenOptions { eager_writeback: true, ..Default::default() };
    let f = HostFile::open(&p, &opts).unwrap();
    assert!(f.eager_writeback);
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    write_all_at(&f, 4096, &data).unwrap();
    f.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    read_exact_at(&f, 4096, &mut back).unwrap();
    assert_eq!(back, data);
    // Not with unsafe caching, where nothing is ever written back on purpose.
    let g = HostFile::open(&p, &HostOpenOptions { cache: CacheMode::Unsafe, ..opts }).unwrap();
    assert!(!g.eager_writeback);
}
