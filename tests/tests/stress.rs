//! Concurrency stress on the shared model layer (`vdisk_tests::model::stress`): 8 threads run
//! random writes, zeroes, discards and flushes on one `Arc` of an image, each within its own
//! 64 KiB pieces, checking every range right after touching it; afterwards the image must pass
//! `qemu-img check` and compare equal through QEMU to the merged model. qcow2 runs with the
//! smallest metadata caches qemu accepts, so tables are evicted and reloaded all the time.

use std::sync::Arc;

use blockdev::{BlockDriver, MetadataCacheSizes, OpenOptions};
use formats::Registry;
use vdisk_tests::model::{self, Subject};
use vdisk_tests::{qemu_img, s, tempdir};

const SIZE: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;
const THREADS: u64 = 8;
/// Operations per thread (`VDISK_STRESS_OPS` overrides, for long runs).
fn per_thread() -> u64 {
    model::env_number("VDISK_STRESS_OPS").unwrap_or(1500)
}

fn stress(format: &str, cluster: &str, extended: bool, backing: bool) {
    let d = tempdir();
    let reg = Registry::new();
    let backing_len = 12 << 20;
    let (img, initial) = if format == "qcow2" {
        vdisk_tests::model_qcow2(d.path(), &reg, SIZE, cluster, extended, backing.then_some(backing_len)).unwrap()
    } else {
        let img = d.path().join("stress.raw");
        qemu_img(&["create", "-q", "-f", "raw", s(&img), &SIZE.to_string()]).ok();
        (img, vec![0; SIZE as usize])
    };
    let mut opts = OpenOptions::read_write();
    opts.metadata_cache = MetadataCacheSizes { total: None, l2: Some(1), refcount: Some(1) };
    let backing_bytes = vec![0x77u8; backing_len as usize];
    let open = || vdisk_tests::open_image(&reg, &img, Some(format), &opts);
    let subject = Subject { open: &open, backing: backing.then_some(&backing_bytes[..]) };
    let drv: Arc<dyn BlockDriver> = open().unwrap();
    let (merged, stats) = model::stress(&subject, &drv, initial, CHUNK, THREADS, per_thread())
        .unwrap_or_else(|e| panic!("{format} {cluster}: {e}"));
    drv.close().unwrap();
    drop(drv);
    eprintln!("stress {format} {cluster} extended={extended} backing={backing}: {stats:?}");
    let c = qemu_img(&["check", "-f", format, s(&img)]);
    assert!(c.code == 0 || format == "raw" && c.code == 63, "qemu-img check: {}{}", c.stdout, c.stderr);
    let expected = d.path().join("expected.raw");
    std::fs::write(&expected, &merged).unwrap();
    let m = qemu_img(&["compare", "-f", format, "-F", "raw", s(&img), s(&expected)]);
    assert_eq!(m.code, 0, "qemu-img compare: {}{}", m.stdout, m.stderr);
}

#[test]
fn qcow2_4k_clusters_under_eight_threads() {
    stress("qcow2", "4k", false, false);
}

#[test]
fn qcow2_with_backing_file_under_eight_threads() {
    stress("qcow2", "64k", false, true);
}

#[test]
fn qcow2_subclusters_with_backing_file_under_eight_threads() {
    stress("qcow2", "32k", true, true);
}

#[test]
fn raw_under_eight_threads() {
    stress("raw", "", false, false);
}
