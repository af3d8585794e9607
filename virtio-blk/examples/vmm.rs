//! How a VMM embeds vdisk's virtio-blk device: open an image with the format registry, wrap it in
//! a `BlockDevice`, answer the transport's feature and config reads from it, and on every queue
//! notification ("kick") call `virtio_blk::process_queue`, raising the interrupt when it says so.
//!
//! Here the "guest" is this program: it lays out a split virtqueue in guest memory, places a
//! write and a read request in it as a virtio driver would, and kicks.
//!
//! Run: `cargo run --release -p virtio-blk --example vmm [IMAGE]` (without IMAGE, a temporary
//! 64 MiB qcow2 is created).

use blockdev::options::CreateOptions;
use blockdev::OpenOptions;
use virtio_blk::{process_queue, BlockDevice, DeviceOptions};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The disk: any format vdisk opens, read-write.
    let registry = formats::Registry::new();
    let dir = std::env::temp_dir().join(format!("vdisk-vmm-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = match std::env::args().nth(1) {
        Some(p) => p,
        None => {
            let p = dir.join("disk.qcow2").to_string_lossy().into_owned();
            let mut o = CreateOptions::new();
            o.set("size", "64M");
            registry.create("qcow2", &p, &o)?;
            p
        }
    };
    let image = registry.open(&path, None, &OpenOptions::read_write())?.driver;

    // 2. The device. The transport (PCI or MMIO, the VMM's own) offers `features()` and serves
    //    config reads from `read_config()`.
    let device = BlockDevice::new(image.clone(), &DeviceOptions { num_queues: 1, ..DeviceOptions::default() });
    println!("features {:#x}, capacity {} sectors", device.features(), device.config().capacity);

    // 3. Guest memory and the queue the driver set up (addresses come from the transport).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let mut queue = Queue::new(16)?;
    queue.set_size(16);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);

    // 4. What a driver does: a write of 4 KiB at sector 8, then a read of it back.
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| -> Result<(), vm_memory::GuestMemoryError> {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(DESC_TABLE + i * 16))
    };
    let header = |at: u64, kind: u32, sector: u64| {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at))
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    header(0x3000, virtio_blk::request::kind::OUT, 8)?;
    mem.write_slice(&[0xabu8; 4096], GuestAddress(0x4000))?;
    desc(0, 0x3000, 16, NEXT, 1)?;
    desc(1, 0x4000, 4096, NEXT, 2)?;
    desc(2, 0x6000, 1, WRITE, 0)?;
    header(0x3010, virtio_blk::request::kind::IN, 8)?;
    desc(3, 0x3010, 16, NEXT, 4)?;
    desc(4, 0x7000, 4096, NEXT | WRITE, 5)?;
    desc(5, 0x6001, 1, WRITE, 0)?;
    mem.write_slice(&[0, 0, 2, 0, 0, 0, 3, 0], GuestAddress(AVAIL))?; // flags, idx 2, ring [0, 3]

    // 5. The kick: serve the queue, then interrupt the guest if needed.
    if process_queue(&device, &mut queue, &mem)? {
        println!("interrupt: used ring updated");
    }
    let mut status = [0u8; 2];
    mem.read_slice(&mut status, GuestAddress(0x6000))?;
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x7000))?;
    println!(
        "statuses {status:?}, read back {}",
        if back == [0xab; 4096] { "what was written" } else { "something else" }
    );
    assert_eq!(status, [0, 0]);
    assert!(back == [0xab; 4096]);

    // 6. Shutdown: close the image (flushes and clears its dirty marks).
    image.close()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
