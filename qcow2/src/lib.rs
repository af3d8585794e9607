//! vdisk's qcow2 driver.
//!
//! Reads and writes qcow2 version 2 and 3 images: cluster sizes 512 B to 2 MiB, refcount widths 1
//! to 64 bits, zero clusters, compressed clusters (zlib and zstd), extended L2 entries
//! (subclusters), external data files, lazy refcounts with the dirty bit, the corrupt bit, and
//! preallocation; internal snapshots (`snapshot/`, with the VM state area a VMM saves into);
//! persistent dirty bitmaps (`bitmap/`); encryption, LUKS and legacy AES (`crypt.rs`: only guest
//! data is encrypted, in private buffers, whole 512-byte sectors at a time); plus `check` with
//! repair. Guest I/O runs on the mapping core (`blockdev::mapped`): `mapping.rs` turns L2 entries
//! into mappings and `write.rs`'s plans into write plans.
//!
//! # Crash consistency
//! The update order (DESIGN.md, section 5, "Crash consistency") is kept by construction:
//! 1. guest data is written to a newly allocated cluster before its L2 entry is changed in the cache
//!    (`mapping.rs`: the entry changes in the commit of the mapping core's write, which only runs
//!    once the data is written), and the L2 table reaches the file only at a flush or eviction,
//!    after a sync;
//! 2. refcount increases happen at allocation time in the refcount cache; a flush writes refcount
//!    blocks (and refcount table entries) and syncs before it writes any L2 table, and syncs again
//!    before writing L1 entries that point to new L2 tables (`meta.rs`);
//! 3. refcount decreases are queued and applied after the flush that made the last reference to
//!    the cluster disappear from disk, so a crash can leak a cluster but never free one in use;
//! 4. the header is updated with a one-sector write after what it points to is durable (L1 growth,
//!    refcount table growth, rebuilds);
//! 5. with lazy refcounts the dirty bit is made durable before the first allocation; a clean close
//!    clears it, and opening a dirty image read-write rebuilds the refcounts first;
//! 6. snapshot operations raise refcounts before anything on disk points at what they count and
//!    lower them only after the pointer is gone (`snapshot/ops.rs`), so a crash leaks at worst;
//! 7. bitmap changes write new bit data, tables and directory, sync, switch the header, sync, and
//!    only then free the old ones; bitmaps recording writes are marked in use on disk first
//!    (`bitmap/`);
//! 8. a freed cluster's space is given back to the file system (`discard.rs`) only once its
//!    refcount of zero is durable, and never once it is allocated again;
//! 9. creating an encrypted image writes the LUKS area into clusters it allocated before the
//!    header names them (`create.rs`).
//!
//! # Hostile images
//! Every header field is checked against the file size and the limits in [`limits`] before a table
//! is read; data writes that would land on metadata are refused and the image is marked corrupt;
//! entries breaking the format's rules are reported as corruption instead of being followed.

mod amend;
mod backing;
pub mod bitmap;
mod cache;
mod check;
mod compress;
mod compressed;
mod create;
mod crypt;
mod discard;
mod driver;
mod entry;
mod grow;
pub mod header;
mod imrt;
pub mod limits;
mod mapping;
mod measure;
mod meta;
#[cfg(test)]
mod meta_tests;
mod open;
mod rebuild;
mod refcount;
mod resize;
pub mod snapshot;
mod status;
mod write;

use std::sync::Arc;

use blockdev::options::{CreateOptions, OptionSpec};
use blockdev::{BlockDriver, Chain, Format, OpenOptions, Opener, Result, Storage};

pub use blockdev::info::storage_info;
pub use driver::Qcow2;

/// The qcow2 format's registry entry.
#[derive(Debug, Default)]
pub struct Qcow2Format;

impl Format for Qcow2Format {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, head: &[u8], _filename: &str) -> u32 {
        if head.len() >= 8
            && head[..4] == header::MAGIC.to_be_bytes()
            && u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 2
        {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &Chain,
        opener: &dyn Opener,
    ) -> Result<Arc<dyn BlockDriver>> {
        Ok(Qcow2::open(storage, opts, chain, opener)?)
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        create::CREATE_OPTIONS
    }

    fn create(&self, filename: &str, opts: &CreateOptions, opener: &dyn Opener) -> Result<()> {
        create::create(filename, opts, opener)
    }

    fn measure(&self, size: u64, source: Option<&dyn BlockDriver>, opts: &CreateOptions) -> Result<blockdev::Measure> {
        measure::measure(size, source, opts)
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn can_compress(&self) -> bool {
        true
    }

    fn amend_options(&self) -> Option<&'static [OptionSpec]> {
        Some(amend::AMEND_OPTIONS)
    }
}
