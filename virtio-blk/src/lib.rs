//! vdisk's virtio-blk device backend, for VMMs that embed it and for the vhost-user-blk daemon
//! (`vdisk serve --vhost-user`).
//!
//! - [`config`]: feature bits and the configuration space.
//! - [`request`]: descriptor chains to requests, with the specification's rules enforced.
//! - [`device`]: [`BlockDevice`], which executes requests against any `Arc<dyn BlockDriver>`
//!   (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES) without bounce buffers.
//! - [`process_queue`]: serves a rust-vmm `virtio_queue::Queue` (what a VMM calls on a kick).
//! - [`vhost_user`]: the same device behind a vhost-user socket.
//!
//! # Invariants
//! Nothing a guest puts in a ring is trusted: addresses are checked against guest memory with
//! the access their direction needs before use, lengths are summed in u64 and bounded by the
//! capacity and the advertised limits, malformed chains get `IOERR` or (without a status byte)
//! length 0 and a broken device; no panic on any input (the `virtio_blk_request` fuzz target).

pub mod config;
pub mod device;
pub mod request;
pub mod vhost_user;

use std::ops::Deref;

pub use device::{BlockDevice, DeviceOptions};
use request::{Desc, MAX_DESCRIPTORS};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// Serves every available chain of `queue` with `device`; returns whether the driver must be
/// notified (interrupt) now.
pub fn process_queue<M>(device: &BlockDevice, queue: &mut Queue, mem: M) -> Result<bool, virtio_queue::Error>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
        let head = chain.head_index();
        let descs: Vec<Desc> = chain
            .take(MAX_DESCRIPTORS + 1)
            .map(|d| Desc { addr: d.addr().0, len: d.len(), write: d.is_write_only() })
            .collect();
        let len = device.handle_chain(&descs, &*mem);
        queue.add_used(&*mem, head, len)?;
        used = true;
    }
    if used {
        queue.needs_notification(&*mem)
    } else {
        Ok(false)
    }
}
