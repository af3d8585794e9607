//! The temporary overlay of snapshot mode (`formats::TemporaryOverlay`): guest writes land in a
//! throwaway qcow2 over the image; the image is unchanged byte for byte unless `commit` is called,
//! after which `qemu-img compare` finds the guest's content in it and `qemu-img check` finds it
//! clean. Bases: qcow2, qcow2 with its own backing file, raw. The overlay file is private (0600),
//! in `TMPDIR` (or the given directory) and unlinked.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::{BlockDriver, ErrorKind, ExtentKind, ResizeOptions, ZeroFlags};
use formats::{OverlayOptions, Registry, TemporaryOverlay};
use vdisk_tests::{qemu_img, qemu_io, qemu_io_write, s, tempdir};

const MIB: u64 = 1 << 20;

/// Options putting the overlay file into `dir`.
fn in_dir(dir: &Path) -> OverlayOptions {
    std::fs::create_dir_all(dir).expect("overlay directory");
    OverlayOptions { dir: Some(dir.to_path_buf()), ..OverlayOptions::default() }
}

fn open(base: &Path, fmt: Option<&str>, opts: &OverlayOptions) -> TemporaryOverlay {
    TemporaryOverlay::open(Arc::new(Registry::new()), s(base), fmt, opts)
        .unwrap_or_else(|e| panic!("open overlay over {}: {e:#}", base.display()))
}

fn whole(drv: &dyn BlockDriver) -> Vec<u8> {
    let mut buf = vec![0u8; drv.size() as usize];
    drv.read_at(0, &mut [std::io::IoSliceMut::new(&mut buf)]).expect("read the whole disk");
    buf
}

fn write(drv: &dyn BlockDriver, model: &mut [u8], offset: u64, len: usize, pattern: u8) {
    let data = vec![pattern; len];
    drv.write_at(offset, &[std::io::IoSlice::new(&data)]).expect("write through the overlay");
    model[offset as usize..offset as usize + len].fill(pattern);
}

/// The bytes of a file, to prove it unchanged.
fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Panics unless `path` still holds exactly `before`, naming the first differing byte.
fn assert_unchanged(path: &Path, before: &[u8], when: &str) {
    let after = file_bytes(path);
    if after != before {
        let first = before.iter().zip(&after).position(|(a, b)| a != b).unwrap_or(before.len().min(after.len()));
        panic!(
            "{} changed {when}: {} bytes before, {} after, first difference at byte {first}",
            path.display(),
            before.len(),
            after.len()
        );
    }
}

/// Panics unless the guest view equals the model, naming the first differing byte.
fn assert_reads(drv: &dyn BlockDriver, model: &[u8], when: &str) {
    let got = whole(drv);
    assert_eq!(got.len(), model.len(), "disk size {when}");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{when}: byte {i} reads {:#x}, expected {:#x}", got[i], model[i]);
    }
}

/// `qemu-img compare` of `image` against a raw file holding `expected`, and `qemu-img check`.
fn assert_image_holds(dir: &Path, image: &Path, fmt: &str, expected: &[u8]) {
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, expected).expect("write the expected content");
    let c = qemu_img(&["compare", "-f", fmt, "-F", "raw", s(image), s(&raw)]);
    assert_eq!(c.code, 0, "qemu-img compare {}: {}{}", image.display(), c.stdout, c.stderr);
    if fmt == "qcow2" {
        let k = qemu_img(&["check", "-f", fmt, s(image)]);
        assert_eq!(k.code, 0, "qemu-img check {}: {}{}", image.display(), k.stdout, k.stderr);
    }
}

/// A qcow2 base of `size` bytes holding `runs` of (pattern, offset, len), made by qemu-img and
/// qemu-io; returns its path and content.
fn qcow2_base(dir: &Path, size: u64, runs: &[(u8, u64, u64)]) -> (PathBuf, Vec<u8>) {
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), &size.to_string()]).ok();
    let mut model = vec![0u8; size as usize];
    for &(p, off, len) in runs {
        qemu_io_write(&base, "qcow2", p, off, len);
        model[off as usize..(off + len) as usize].fill(p);
    }
    (base, model)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list directory")
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_show_through_the_overlay_and_never_reach_the_base() {
    let d = tempdir();
    let (base, mut model) = qcow2_base(d.path(), 4 * MIB, &[(0x11, 0, MIB), (0x22, 2 * MIB, MIB)]);
    let before = file_bytes(&base);
    let tmp = d.path().join("tmp");
    let ov = open(&base, Some("qcow2"), &in_dir(&tmp));
    assert_eq!(ov.size(), 4 * MIB);
    assert_eq!(ov.format(), "qcow2");
    assert!(!ov.is_read_only());
    assert!(ov.base().is_read_only(), "the base is opened read-only");
    assert_eq!(ov.backing().expect("backing").filename(), s(&base));
    assert_reads(&ov, &model, "before any write");

    write(&ov, &mut model, 512, 1000, 0xaa); // unaligned, inside base data
    write(&ov, &mut model, MIB - 4096, 8192, 0xbb); // straddles base data and a hole
    write(&ov, &mut model, 3 * MIB + MIB / 2, 64 << 10, 0xcc); // unallocated in the base
    assert_reads(&ov, &model, "after the writes");
    ov.flush().expect("flush");
    assert_unchanged(&base, &before, "while the overlay is open");

    // The base is held like a read-only QEMU open: nobody else may write it.
    let w = qemu_io(&["-f", "qcow2", "-c", "write 0 512", s(&base)]);
    assert_ne!(w.code, 0, "qemu-io wrote the base under the overlay: {}", w.stdout);
    assert!(w.stderr.contains("lock"), "qemu-io's complaint: {}", w.stderr);

    drop(ov);
    assert_unchanged(&base, &before, "after dropping the overlay");
    assert_eq!(dir_entries(&tmp), Vec::<String>::new(), "nothing is left in the temporary directory");
    let mut unchanged = vec![0u8; 4 * MIB as usize];
    unchanged[..MIB as usize].fill(0x11);
    unchanged[2 * MIB as usize..3 * MIB as usize].fill(0x22);
    assert_image_holds(d.path(), &base, "qcow2", &unchanged);
}

#[test]
fn commit_writes_the_overlay_into_the_base_and_the_session_goes_on() {
    let d = tempdir();
    let (base, mut model) = qcow2_base(d.path(), 8 * MIB, &[(0x11, 0, 2 * MIB)]);
    let ov = open(&base, Some("qcow2"), &in_dir(&d.path().join("tmp")));
    write(&ov, &mut model, 4096, 10_000, 0xa1);
    // Where the base holds nothing yet.
    write(&ov, &mut model, 5 * MIB + 300, 70_000, 0xa2);
    // Reading warms the base driver's metadata caches, which commit must not leave stale.
    assert_reads(&ov, &model, "before commit");

    ov.commit().unwrap_or_else(|e| panic!("commit: {e:#}"));
    let ext = ov.block_status(5 * MIB, 64 << 10).expect("block status");
    assert_eq!(ext.kind, ExtentKind::Unallocated, "commit empties the overlay");
    assert_reads(&ov, &model, "after commit (through the reopened base)");
    assert!(ov.base().is_read_only(), "the base is read-only again after commit");
    assert_image_holds(d.path(), &base, "qcow2", &model);

    // The session goes on; what is written now is thrown away again.
    let committed = file_bytes(&base);
    let mut later = model.clone();
    write(&ov, &mut later, 4096, 512, 0xb1);
    write(&ov, &mut later, 7 * MIB, MIB as usize, 0xb2);
    assert_reads(&ov, &later, "after writing past the commit");
    drop(ov);
    assert_unchanged(&base, &committed, "after dropping the overlay that was committed once");
    assert_image_holds(d.path(), &base, "qcow2", &model);
}

#[test]
fn zeroes_and_discards_land_in_the_overlay_and_commit_as_zeros() {
    let d = tempdir();
    let (base, mut model) = qcow2_base(d.path(), 4 * MIB, &[(0x5a, 0, 4 * MIB)]);
    let before = file_bytes(&base);
    let ov = open(&base, Some("qcow2"), &in_dir(&d.path().join("tmp")));
    let zero = |off: u64, len: u64, may_unmap: bool, model: &mut Vec<u8>| {
        ov.write_zeroes(off, len, ZeroFlags { may_unmap, no_fallback: false }).expect("write zeroes");
        model[off as usize..(off + len) as usize].fill(0);
    };
    zero(64 << 10, 128 << 10, false, &mut model);
    zero(MIB + 100, 3000, true, &mut model); // partial cluster: written as zero data
    ov.discard(2 * MIB, 256 << 10).expect("discard");
    model[2 * MIB as usize..(2 * MIB + (256 << 10)) as usize].fill(0);
    assert_reads(&ov, &model, "after zeroes and discards");
    for off in [64 << 10, 2 * MIB] {
        let ext = ov.block_status(off, 64 << 10).expect("block status");
        assert_eq!(ext.kind, ExtentKind::Zero, "the overlay records zeros at {off}, not base data");
    }
    ov.flush().expect("flush");
    assert_unchanged(&base, &before, "after zeroes and discards in the overlay");

    ov.commit().unwrap_or_else(|e| panic!("commit: {e:#}"));
    assert_reads(&ov, &model, "after commit");
    drop(ov);
    assert_image_holds(d.path(), &base, "qcow2", &model);
}

#[test]
fn a_qcow2_base_with_its_own_backing_file() {
    let d = tempdir();
    let backing = d.path().join("backing.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&backing), &(4 * MIB).to_string()]).ok();
    qemu_io_write(&backing, "raw", 0x33, 0, 4 * MIB);
    let base = d.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&backing), "-F", "raw", s(&base)]).ok();
    qemu_io_write(&base, "qcow2", 0x44, MIB, MIB);
    let mut model = vec![0x33u8; 4 * MIB as usize];
    model[MIB as usize..2 * MIB as usize].fill(0x44);
    let original = model.clone();
    let base_before = file_bytes(&base);
    let backing_before = file_bytes(&backing);

    let session = |model: &mut Vec<u8>| {
        let ov = open(&base, None, &in_dir(&d.path().join("tmp")));
        let chain = ov.base().backing().expect("the base's backing file is open");
        assert_eq!(chain.filename(), s(&backing));
        assert_reads(&ov, model, "through two layers");
        write(&ov, model, MIB + MIB / 2, MIB as usize, 0x55); // base data and backing-only data
        ov.write_zeroes(3 * MIB, 64 << 10, ZeroFlags::default()).expect("write zeroes");
        model[3 * MIB as usize..(3 * MIB + (64 << 10)) as usize].fill(0);
        assert_reads(&ov, model, "after the writes");
        ov
    };

    let mut scratch = original.clone();
    drop(session(&mut scratch));
    assert_unchanged(&base, &base_before, "after a session without commit");
    assert_unchanged(&backing, &backing_before, "after a session without commit");

    let ov = session(&mut model);
    ov.commit().unwrap_or_else(|e| panic!("commit: {e:#}"));
    assert_reads(&ov, &model, "after commit");
    drop(ov);
    assert_unchanged(&backing, &backing_before, "after commit into the image above it");
    assert_image_holds(d.path(), &base, "qcow2", &model);
    let info = qemu_img(&["info", "--output=json", s(&base)]).ok();
    assert!(info.stdout.contains(&format!("\"backing-filename\": \"{}\"", s(&backing))), "{}", info.stdout);
}

#[test]
fn a_raw_base_and_an_overlay_grown_by_the_guest() {
    let d = tempdir();
    let base = d.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), &(2 * MIB).to_string()]).ok();
    qemu_io_write(&base, "raw", 0x66, 0, MIB);
    let mut model = vec![0u8; 2 * MIB as usize];
    model[..MIB as usize].fill(0x66);
    let before = file_bytes(&base);

    let ov = open(&base, Some("raw"), &in_dir(&d.path().join("tmp")));
    assert_eq!(ov.base().format(), "raw");
    let mut scratch = model.clone();
    write(&ov, &mut scratch, 1000, 5000, 0x77);
    ov.discard(0, 2 * MIB).expect("discard");
    assert_reads(&ov, &vec![0u8; 2 * MIB as usize], "after discarding everything");
    drop(ov);
    assert_unchanged(&base, &before, "after dropping the overlay");

    let ov = open(&base, Some("raw"), &in_dir(&d.path().join("tmp")));
    write(&ov, &mut model, 1000, 5000, 0x77);
    ov.resize(3 * MIB, &ResizeOptions::default()).expect("grow the overlay");
    model.resize(3 * MIB as usize, 0);
    write(&ov, &mut model, 2 * MIB + 4096, 100_000, 0x88);
    assert_reads(&ov, &model, "after growing");
    assert_unchanged(&base, &before, "while the overlay is open");
    ov.commit().unwrap_or_else(|e| panic!("commit: {e:#}"));
    assert_eq!(std::fs::metadata(&base).expect("stat base").len(), 3 * MIB, "commit grows the base");
    assert_reads(&ov, &model, "after commit");
    drop(ov);
    assert_image_holds(d.path(), &base, "raw", &model);
}

#[test]
fn a_failed_commit_keeps_the_session() {
    let d = tempdir();
    let base = d.path().join("base.img");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), &MIB.to_string()]).ok();
    qemu_io_write(&base, "raw", 0x99, 64 << 10, 64 << 10);
    let before = file_bytes(&base);
    let mut model = vec![0u8; MIB as usize];
    model[64 << 10..128 << 10].fill(0x99);

    // Probed as raw: writing a qcow2 header into its first sector is refused (qemu's rule), so
    // the commit of that write fails when the base is reopened read-write.
    let ov = open(&base, None, &in_dir(&d.path().join("tmp")));
    let magic = [b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3];
    ov.write_at(0, &[std::io::IoSlice::new(&magic)]).expect("the overlay takes any write");
    model[..8].copy_from_slice(&magic);
    let e = ov.commit().expect_err("commit of a first sector that would turn the raw image into qcow2");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e:#}");
    assert!(e.message().starts_with(&format!("Could not commit the temporary overlay into '{}'", s(&base))), "{e}");
    assert_eq!(e.context().path.as_deref(), Some(s(&base)));
    assert_unchanged(&base, &before, "after a failed commit");

    // The overlay still holds the guest's data; the base is open again below it.
    assert_reads(&ov, &model, "after the failed commit");
    assert!(ov.base().is_read_only());
    write(&ov, &mut model, 200_000, 4096, 0x42);
    assert_reads(&ov, &model, "writing after the failed commit");
    drop(ov);
    assert_unchanged(&base, &before, "after dropping the overlay");
}

#[test]
fn opening_errors_name_the_file_and_leave_nothing_behind() {
    let d = tempdir();
    let tmp = d.path().join("tmp");
    let missing = d.path().join("missing.qcow2");
    let e = TemporaryOverlay::open(Arc::new(Registry::new()), s(&missing), Some("qcow2"), &in_dir(&tmp))
        .expect_err("a missing image");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}");
    assert!(e.message().contains(s(&missing)), "{e}");
    assert_eq!(dir_entries(&tmp), Vec::<String>::new());

    let (base, _) = qcow2_base(d.path(), MIB, &[]);
    let nowhere = d.path().join("no-such-dir");
    let opts = OverlayOptions { dir: Some(nowhere.clone()), ..OverlayOptions::default() };
    let e = TemporaryOverlay::open(Arc::new(Registry::new()), s(&base), None, &opts).expect_err("a missing directory");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}");
    assert_eq!(
        e.message(),
        format!("Could not create a temporary overlay in '{}': No such file or directory", nowhere.display())
    );
}

/// The open file descriptor of this process whose target is `path`, unlinked.
fn deleted_fd_of(path: &Path) -> Option<PathBuf> {
    let want = format!("{} (deleted)", path.display());
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|fd| std::fs::read_link(fd).is_ok_and(|t| t.to_string_lossy() == want))
}

#[test]
fn the_overlay_file_is_private_and_unlinked() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir();
    let (base, _) = qcow2_base(d.path(), MIB, &[]);
    let tmp = d.path().join("tmp");
    let ov = open(&base, Some("qcow2"), &in_dir(&tmp));
    let path = ov.overlay_path().to_path_buf();
    assert_eq!(path.parent(), Some(tmp.as_path()));
    assert!(!path.exists(), "{} is unlinked once open", path.display());
    assert_eq!(dir_entries(&tmp), Vec::<String>::new());
    let fd = deleted_fd_of(&path).expect("the overlay is open through an unlinked file");
    let mode = std::fs::metadata(&fd).expect("stat the overlay").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "overlay mode {mode:o}");
    drop(ov);
    assert!(deleted_fd_of(&path).is_none(), "dropping the overlay closes its file");
}

#[test]
fn the_default_directory_is_tmpdir() {
    let d = tempdir();
    let tmpdir = d.path().join("my-tmp");
    std::fs::create_dir(&tmpdir).expect("mkdir");
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args(["--exact", "overlay_in_the_default_directory", "--ignored", "--nocapture", "--test-threads=1"])
        .env("TMPDIR", &tmpdir)
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("overlay directory: {}\n", tmpdir.display())), "{stdout}");
    assert_eq!(dir_entries(&tmpdir), Vec::<String>::new(), "the child left files in TMPDIR");
}

/// Run by `the_default_directory_is_tmpdir` with TMPDIR set: opens an overlay without a directory
/// option and reports where its file went.
#[test]
#[ignore = "run by the_default_directory_is_tmpdir in a child process"]
fn overlay_in_the_default_directory() {
    let d = tempdir();
    let (base, _) = qcow2_base(d.path(), MIB, &[]);
    let ov = open(&base, Some("qcow2"), &OverlayOptions::default());
    let dir = ov.overlay_path().parent().expect("parent").to_path_buf();
    assert_eq!(dir, std::env::temp_dir());
    println!("overlay directory: {}", dir.display());
}

#[test]
fn writes_racing_with_commits_are_never_lost() {
    const REGION: u64 = 2 * MIB;
    const WRITERS: u64 = 2;
    let d = tempdir();
    let (base, _) = qcow2_base(d.path(), WRITERS * REGION, &[]);
    let ov = open(&base, Some("qcow2"), &in_dir(&d.path().join("tmp")));
    let done = std::sync::atomic::AtomicBool::new(false);
    let regions: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (ov, done) = (&ov, &done);
                scope.spawn(move || {
                    // Each writer owns a region and keeps its model; it writes until the commits
                    // are over, then a few more times.
                    let mut model = vec![0u8; REGION as usize];
                    let mut rng = vdisk_tests::XorShift::new(t + 1);
                    let mut after = 0;
                    for i in 0u32.. {
                        if done.load(std::sync::atomic::Ordering::SeqCst) {
                            after += 1;
                            if after > 8 {
                                break;
                            }
                        }
                        let off = rng.below(REGION / 4096 - 16) * 4096;
                        let len = (1 + rng.below(16) as usize) * 4096;
                        let data = vec![(i % 250) as u8 + 1; len];
                        ov.write_at(t * REGION + off, &[std::io::IoSlice::new(&data)]).expect("racing write");
                        model[off as usize..off as usize + len].copy_from_slice(&data);
                    }
                    model
                })
            })
            .collect();
        for _ in 0..20 {
            ov.commit().unwrap_or_else(|e| panic!("commit while writing: {e:#}"));
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        writers.into_iter().map(|w| w.join().expect("writer")).collect()
    });
    let model = regions.concat();
    assert_reads(&ov, &model, "after racing writes and commits");
    ov.commit().unwrap_or_else(|e| panic!("final commit: {e:#}"));
    drop(ov);
    assert_image_holds(d.path(), &base, "qcow2", &model);
}
