//! Feeds fuzzed bytes to the NBD server as everything a client sends on one connection
//! (`nbd::handle`: negotiation, then requests), against two in-memory exports: a writable raw
//! disk named "disk" and a read-only one named "ro" that starts as the same bytes.
//!
//! Input layout: the first byte picks the stream prefix: with bit 0 set the target prepends a
//! valid client-flags word and `NBD_OPT_GO` for the export bit 1 selects (with structured replies
//! and both metadata contexts when bit 2 is set), so mutations reach the transmission phase; the
//! rest of the input follows as raw client bytes.
//!
//! Asserts: no panic, hang or unbounded allocation, whatever the client sends; the read-only
//! export's bytes never change.

#![no_main]

use std::sync::Arc;

use blockdev::{Chain, MemStorage};
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 256 << 10;

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn export(name: &str, read_only: bool) -> (nbd::Export, Arc<MemStorage>) {
    let mut bytes = vec![0u8; SIZE];
    bytes[..4096].fill(0x5a);
    let storage = Arc::new(MemStorage::new(name, bytes));
    let opts = vdisk_fuzz::isolated_open_options(!read_only);
    let registry = formats::Registry::new();
    let raw = registry.format("raw").expect("raw format");
    let image = raw.open(storage.clone(), &opts, &Chain::new(), &registry).expect("raw opens");
    let e = nbd::Export { name: name.into(), description: String::new(), image, read_only, multi_conn: true };
    (e, storage)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (disk, _) = export("disk", false);
    let (ro, ro_storage) = export("ro", true);
    let mut stream = Vec::with_capacity(rest.len() + 128);
    if mode & 1 != 0 {
        stream.extend_from_slice(&3u32.to_be_bytes());
        if mode & 4 != 0 {
            option(&mut stream, 8, &[]);
            let mut q = vec![0, 0, 0, 0, 0, 0, 0, 2];
            for c in ["base:allocation", "qemu:allocation-depth"] {
                q.extend_from_slice(&(c.len() as u32).to_be_bytes());
                q.extend_from_slice(c.as_bytes());
            }
            option(&mut stream, 10, &q);
        }
        let name: &[u8] = if mode & 2 != 0 { b"ro" } else { b"disk" };
        let mut go = (name.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(name);
        go.extend_from_slice(&[0, 1, 0, 3]);
        option(&mut stream, 7, &go);
    }
    stream.extend_from_slice(rest);
    let _ = nbd::handle(&stream[..], std::io::sink(), &[disk, ro]);
    let check = ro_storage.snapshot();
    // A slice comparison (memcmp) rather than a byte loop, which the coverage hooks make slow.
    let mut want = vec![0u8; SIZE];
    want[..4096].fill(0x5a);
    assert!(check == want, "read-only export changed");
});
