//! A vhost-user-blk backend: the [`BlockDevice`] served to a vhost-user frontend (QEMU's
//! `vhost-user-blk-pci`) through rust-vmm's vhost-user-backend.
//!
//! Each queue gets its own worker thread (queues are independent; the image is shared and
//! thread-safe). The frontend reads the capacity through `GET_CONFIG`, so the `CONFIG` protocol
//! feature is offered, with `MQ` for several queues. A chain is taken off the ring, executed,
//! and returned to the used ring before the next one; the driver is notified once per batch
//! (with `EVENT_IDX`, notifications are re-enabled and the ring re-checked before sleeping).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::device::BlockDevice;
use crate::request::{Desc, MAX_DESCRIPTORS};

/// Ring size offered to the frontend.
pub const QUEUE_SIZE: usize = 1024;

/// The vhost-user backend of one block device.
pub struct VhostUserBlk {
    device: Arc<BlockDevice>,
    num_queues: usize,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk").field("device", &self.device).field("num_queues", &self.num_queues).finish()
    }
}

impl VhostUserBlk {
    /// A backend for `device` with `num_queues` queues (the device's configuration says the same).
    pub fn new(device: Arc<BlockDevice>) -> VhostUserBlk {
        let num_queues = device.config().num_queues as usize;
        VhostUserBlk { device, num_queues, event_idx: AtomicBool::new(false), mem: RwLock::new(None) }
    }

    /// Executes every available chain of `vring`; notifies the driver if it needs it.
    fn process(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut used = false;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .take(MAX_DESCRIPTORS + 1)
                .map(|d| Desc { addr: d.addr().0, len: d.len(), write: d.is_write_only() })
                .collect();
            let len = self.device.handle_chain(&descs, &*mem);
            vring.add_used(head, len).map_err(|e| io::Error::other(format!("add_used: {e:?}")))?;
            used = true;
        }
        if used && vring.needs_notification().map_err(|e| io::Error::other(format!("{e:?}")))? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!("event for unknown queue {device_event}")));
        };
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                vring.disable_notification().map_err(|e| io::Error::other(format!("{e:?}")))?;
                self.process(vring)?;
                if !vring.enable_notification().map_err(|e| io::Error::other(format!("{e:?}")))? {
                    break;
                }
            }
        } else {
            self.process(vring)?;
        }
        Ok(())
    }
}

/// Serves `device` on the unix socket `path` until the frontend disconnects.
pub fn serve(device: Arc<BlockDevice>, path: &str) -> io::Result<()> {
    let backend = Arc::new(VhostUserBlk::new(device));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = vhost_user_backend::VhostUserDaemon::new("vdisk-vhost-user-blk".into(), backend, mem)
        .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
    daemon.serve(path).map_err(|e| io::Error::other(format!("vhost-user: {e}")))
}
